"""Chaos test for the local stack's Redis: `sinkserve up` (a real subprocess, tiny model) keeps its data in a data
directory with the append-only file on, behind a password, and restarts redis-server when it dies.

kill -9 of redis-server loses no acknowledged turn: the supervisor restarts it on the same port and data
directory, tenant, API key, session and transcript are intact (byte-identical), and the next turn works within
a stated bound. A whole `sinkserve up` restart on the same data directory resumes the chat. Every listening
socket of the stack is on loopback but Ray's one documented exception.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from sinkserve.client import SinkServeClient
from sinkserve.config import RedisConfig
from sinkserve.store import Store
from sinkserve.store.keys import Keys
from sinkserve.store.redis_server import free_port
from sinkserve.store.tenants import digest

from .conftest import SINKS, WINDOW, wait_serving
from .loopback import assert_loopback_only

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RECOVERY_ATTEMPTS = 60  # redis-server killed -> the session's next turn is served again (0.5 s apart)
START_BOUND_S = 240  # `sinkserve up` with the tiny model on a busy 2-core machine


class Up:
    """One `sinkserve up` subprocess in its own process group, with a private cache dir (client defaults)."""

    extra_args: tuple[str, ...] = ()  # more flags for `up` (a later flag wins over the same one above)

    def __init__(self, checkpoint: Path, cache_dir: Path, data_dir: Path, log_path: Path):
        self.checkpoint, self.cache_dir, self.data_dir, self.log_path = checkpoint, cache_dir, data_dir, log_path
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.redis_pids: set[int] = set()  # every redis-server this stack started (for cleanup)

    @property
    def env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SINKSERVE_", "RAY_"))}
        return {
            **inherited,
            "SINKSERVE_CACHE_DIR": str(self.cache_dir),
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def start(self) -> "Up":
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "sinkserve.cli", "up",
            "--model", str(self.checkpoint), "--device", "cpu", "--dtype", "float32",
            "--replicas", "1", "--replica-cpus", "0.5", "--num-cpus", "2", "--num-threads", "1",
            "--slots", "4", "--sinks", str(SINKS), "--window", str(WINDOW),
            "--port", str(port), "--http-port", str(free_port()), "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_serving(self.address, self.process, timeout_s=START_BOUND_S)
        except BaseException as err:
            raise RuntimeError(f"{err}\n--- sinkserve up log ---\n{self.log()[-4000:]}") from err
        self.redis_pid()  # records it
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def redis_pid(self) -> int:
        """The redis-server child of this `up` (its supervisor starts it as a direct child)."""
        assert self.process is not None
        children = [p for p in psutil.Process(self.process.pid).children() if p.name() == "redis-server"]
        assert len(children) == 1, children
        self.redis_pids.add(children[0].pid)
        return children[0].pid

    def defaults(self) -> dict[str, str]:
        return json.loads((self.cache_dir / "client.json").read_text())

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "sinkserve.cli", *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stop(self) -> None:
        """SIGTERM (what Ctrl-C does), then whatever of its process group is left; then any redis-server it
        started that is still alive (a failed run must not leave one behind)."""
        if self.process is not None:
            process, self.process = self.process, None
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(90)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the group we created: stray Ray workers
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.redis_pids:
            try:
                proc = psutil.Process(pid)
                # Still the redis-server it started (redis-server runs in its data directory), not a reused pid.
                if proc.name() == "redis-server" and Path(proc.cwd()) == self.data_dir.resolve():
                    proc.kill()
            except psutil.Error:
                pass


def store_read(defaults: dict[str, str], read):
    """Run `read(store)` against the stack's Redis, with the password `up` saved (as `sinkserve tenant` does)."""

    async def main():
        store = Store.from_config(RedisConfig(url=defaults["redis_url"], password=defaults["local_redis_password"]))
        try:
            return await read(store)
        finally:
            await store.close()

    return asyncio.run(main())


def snapshot(defaults: dict[str, str], sid: str, api_key: str):
    """What must survive: the tenant behind the key, the session record, the transcript's bytes."""

    async def read(store: Store):
        tenant = await store.tenants.authenticate(api_key)
        record = await store.sessions.get_session(sid)
        blobs = await store.redis.lrange(store.keys.transcript(sid), 0, -1)
        return (tenant.name if tenant else None), record.tenant, blobs

    return store_read(defaults, read)


def turn_until_served(client: SinkServeClient, sid: str, text: str, attempts: int, max_tokens: int = 4,
                      pause_s: float = 0.5):
    """The next greedy turn, retried while the stack answers UNAVAILABLE (Redis or a replica coming back), at most
    `attempts` times, `pause_s` apart: a bounded poll (a recovery that never comes fails), no time asserted."""
    for attempt in range(attempts):
        try:
            return client.chat(sid, text, max_tokens=max_tokens, temperature=0.0)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(pause_s)


def test_redis_kill_9_and_a_whole_restart_lose_nothing(tiny_checkpoint, tmp_path):
    data_dir = tmp_path / "redis-data"
    up = Up(tiny_checkpoint, tmp_path / "cache", data_dir, tmp_path / "up.log")
    second: Up | None = None
    try:
        up.start()
        defaults = up.defaults()
        password = defaults["local_redis_password"]
        assert defaults["local_redis_url"] == defaults["redis_url"]
        assert (up.cache_dir / "client.json").stat().st_mode & 0o077 == 0  # the password file is private
        assert (data_dir / "appendonly.aof").exists() or (data_dir / "appendonlydir").exists()

        # Everything the stack listens on is loopback (redis-server included), but Ray's replica gRPC server.
        assert_loopback_only(up.process.pid, replicas=1, app_name="sinkserve")

        # A tenant through the CLI (which reads the saved URL and password), a session and a turn over gRPC.
        api_key = up.cli("tenant", "create", "durable").strip().splitlines()[-1]
        client = SinkServeClient(up.address, api_key)
        sid = client.create_session(system_prompt="be brief").session_id
        _, first = client.chat(sid, "turn one", max_tokens=4, temperature=0.0)
        assert first.turn == 1
        before = snapshot(defaults, sid, api_key)
        assert before[0] == "durable" and before[1] == "durable" and len(before[2]) == 1  # one entry per turn

        # Without the password Redis refuses everything: no local process can mint an API key any more.
        import redis

        host, port = defaults["redis_url"].removeprefix("redis://").split("/")[0].split(":")
        with redis.Redis(host=host, port=int(port), socket_connect_timeout=2) as anonymous:
            with pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.set(Keys("sinkserve").api_key(digest("sk-ss-minted")), "durable")

        # kill -9 the redis-server this stack started (found as its child, printed in its log).
        old_pid = up.redis_pid()
        assert f"(pid {old_pid}, data in {data_dir}" in up.log()
        os.kill(old_pid, signal.SIGKILL)
        _, second_turn = turn_until_served(client, sid, "turn two", RECOVERY_ATTEMPTS)
        assert second_turn.turn == 2
        new_pid = up.redis_pid()
        assert new_pid != old_pid and f"redis-server restarted (pid {new_pid})" in up.log()
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() != psutil.STATUS_ZOMBIE
        after = snapshot(defaults, sid, api_key)
        assert after[:2] == before[:2]
        assert after[2][: len(before[2])] == before[2]  # the acknowledged turn, byte-identical
        assert len(after[2]) > len(before[2])
        assert client.get_session(sid).turns == 2
        client.close()

        # A whole restart of `sinkserve up` on the same data directory: the chat resumes with turn 3.
        up.stop()
        assert not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE
        second = Up(tiny_checkpoint, up.cache_dir, data_dir, tmp_path / "up.log").start()
        again = second.defaults()
        assert again["local_redis_password"] == password  # the same password across restarts
        client = SinkServeClient(second.address, api_key)  # the saved API key still works
        assert client.get_session(sid).turns == 2
        resumed = snapshot(again, sid, api_key)
        assert resumed == after
        _, third = client.chat(sid, "turn three", max_tokens=4, temperature=0.0)
        assert third.turn == 3
        assert snapshot(again, sid, api_key)[2][: len(after[2])] == after[2]
        assert re.search(r"tenant\s+sessions", second.cli("tenant", "list"))
        client.close()
    finally:
        if second is not None:
            second.stop()
        up.stop()
