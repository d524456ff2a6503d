"""The local redis-server launcher, on real redis-server processes: the ephemeral mode the tests use and the
durable, supervised mode of `sinkserve up` (append-only file, password, restart after kill -9)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sinkserve.store.keys import Keys
from sinkserve.store.redis_server import DataDirInUse, RedisServer
from sinkserve.store.tenants import digest

PASSWORD = "unit-test-password"
KEYS = Keys("sinkserve")
SID = "5e551014" * 4  # a session id of the server-generated form


def wait_for(condition, timeout_s: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout_s}s")


def gone_or_reaped(pid: int) -> bool:
    """The process no longer exists: it exited and its parent reaped it (a zombie still has a pid)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # (its pid reused by now)
    except psutil.NoSuchProcess:
        return True


def bare_client(port: int, password: str | None = None) -> redis.Redis:
    """A client that reports the first failure instead of retrying it."""
    return redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def config(client: redis.Redis, name: str) -> str:
    value = client.config_get(name)[name]
    return value.decode() if isinstance(value, bytes) else value


def test_ephemeral_server_keeps_nothing_and_stops_its_child():
    server = RedisServer().start()
    pid = server.pid
    data_dir = server.log_path.parent
    try:
        with server.client() as client:
            client.set("k", "v")
            assert config(client, "appendonly") == "no"
            assert config(client, "save") == ""
            assert config(client, "bind") == "127.0.0.1"
            assert config(client, "protected-mode") == "yes"
        assert server.supervise is False
    finally:
        server.stop()
    assert gone_or_reaped(pid)
    assert not data_dir.exists()  # the throwaway directory went with it


def test_durable_server_restarts_after_kill_9_with_its_data_and_password(tmp_path):
    data_dir = tmp_path / "redis"
    restarted: list[int] = []
    server = RedisServer(data_dir=data_dir, password=PASSWORD, on_restart=restarted.append).start()
    try:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700  # key hashes and transcripts live here
        with server.client() as client:
            assert config(client, "appendonly") == "yes"
            assert config(client, "appendfsync") == "everysec"
            assert config(client, "bind") == "127.0.0.1"
            assert config(client, "protected-mode") == "yes"
            client.set(KEYS.tenant("acme"), "record")
            client.rpush(KEYS.transcript(SID), b"turn-1", b"turn-2")
            client.set("leased", "owner", px=600_000)
            # Redis writes the append-only file before it answers; only while a slow fsync is in progress does it
            # hold writes back (up to 2 s). Once its AOF buffer is empty they are in the file, and a killed process
            # (unlike a crashed machine) loses nothing that is in the file.
            wait_for(lambda: client.info("persistence")["aof_buffer_length"] == 0, what="the AOF buffer written")
        # The password never appears on a command line (every local user can read /proc/<pid>/cmdline).
        assert PASSWORD not in " ".join(psutil.Process(server.pid).cmdline())
        old_pid, port = server.pid, server.port
        os.kill(old_pid, signal.SIGKILL)  # only the redis-server child this test started
        wait_for(lambda: server.restarts == 1, what="the supervisor restarting redis-server")
        assert server.port == port and server.pid != old_pid and restarted == [server.pid]
        assert gone_or_reaped(old_pid), "the killed redis-server was left a zombie"

        with server.client() as client:
            assert client.get(KEYS.tenant("acme")) == b"record"
            assert client.lrange(KEYS.transcript(SID), 0, -1) == [b"turn-1", b"turn-2"]
            assert 0 < client.pttl("leased") <= 600_000  # expiry times survive too
        # Without the password nothing can be read or written (nor an API key minted).
        with bare_client(port) as anonymous:
            with pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.set(KEYS.api_key(digest("sk-ss-minted")), "acme")
        with bare_client(port, "wrong") as wrong:
            with pytest.raises(redis.exceptions.AuthenticationError):
                wrong.get(KEYS.tenant("acme"))
    finally:
        server.stop()
    assert server.pid is None


def test_durable_data_survives_a_clean_stop_and_a_new_server_on_another_port(tmp_path):
    data_dir = tmp_path / "redis"
    with RedisServer(data_dir=data_dir, password=PASSWORD) as first:
        with first.client() as client:
            client.hset(KEYS.session(SID), mapping={"tenant": "acme", "turns": 3})
        first_port, first_pid = first.port, first.pid
    assert gone_or_reaped(first_pid)
    with RedisServer(data_dir=data_dir, password=PASSWORD) as second:
        assert second.port != first_port or second.pid != first_pid
        with second.client() as client:
            assert client.hgetall(KEYS.session(SID)) == {b"tenant": b"acme", b"turns": b"3"}


def test_stop_ends_supervision_and_leaves_no_process(tmp_path):
    server = RedisServer(data_dir=tmp_path / "redis", password=PASSWORD).start()
    pid, port = server.pid, server.port
    server.stop()
    assert gone_or_reaped(pid)
    time.sleep(0.5)  # long enough for a (wrong) restart to have happened
    assert server.restarts == 0 and server.pid is None
    with pytest.raises(redis.exceptions.ConnectionError):
        bare_client(port, PASSWORD).ping()


def test_one_data_dir_takes_one_server(tmp_path):
    data_dir = tmp_path / "redis"
    with RedisServer(data_dir=data_dir, password=PASSWORD) as first:
        with pytest.raises(DataDirInUse, match="in use"):
            RedisServer(data_dir=data_dir, password=PASSWORD).start()
        assert first.client().ping()
    # Free again once the first one stopped.
    with RedisServer(data_dir=data_dir, password=PASSWORD) as again:
        assert again.client().ping()


def test_a_server_left_behind_by_a_killed_launcher_is_stopped_by_the_next(tmp_path):
    """`sinkserve up` killed with SIGKILL leaves its redis-server running (it holds the data dir's lock); the
    next launcher on that data dir stops exactly that server and starts its own, with the data."""
    data_dir = tmp_path / "redis"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(data_dir), PASSWORD], stdout=subprocess.PIPE, text=True
    )
    orphan_pid = None
    try:
        orphan_pid = int(launcher.stdout.readline())
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher this test started
        launcher.wait()
        orphan = psutil.Process(orphan_pid)
        assert orphan.name() == "redis-server" and orphan.is_running()  # left behind, still holding the lock
        with RedisServer(data_dir=data_dir, password=PASSWORD) as server:
            wait_for(lambda: gone_or_reaped(orphan_pid), what="the left-behind redis-server stopped")
            with server.client() as client:
                assert client.get(KEYS.tenant("left")) == b"behind"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if orphan_pid is not None:  # a failure may have left it: the redis-server our launcher started, no other
            try:
                proc = psutil.Process(orphan_pid)
                if proc.name() == "redis-server" and Path(proc.cwd()) == data_dir.resolve():
                    proc.kill()
            except psutil.Error:
                pass


LAUNCHER = """
import sys, time
from sinkserve.store.keys import Keys
from sinkserve.store.redis_server import RedisServer
server = RedisServer(data_dir=sys.argv[1], password=sys.argv[2]).start()
with server.client() as client:
    client.set(Keys("sinkserve").tenant("left"), "behind")
print(server.pid, flush=True)
time.sleep(600)
"""
