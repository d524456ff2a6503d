"""Tensor parallelism in the served stack: `sinkserve up --tensor-parallel 2` (a real subprocess: redis-server, local
Ray, the Serve app, the gRPC gateway) runs its replica as two shards, rank 0 in the Serve replica and rank 1 a Ray
actor in the replica's placement group.

The model is a tiny random Llama (4 heads, 2 KV heads, FFN 128: it splits in 2; the bundled SmolLM2's 9 heads split
only in 1 or 3, and this machine has 2 cores). Greedy turns over gRPC, past the window, equal the unsharded engine
run in this process. Then one shard's process is killed with SIGKILL mid-turn: the stream ends UNAVAILABLE, the
replica fails its health check and Serve replaces it (new shards), no acknowledged turn is lost, and within a bound
the session's next turn is served from the transcript, equal to the unsharded engine rebuilding the same ends.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import psutil
import pytest

from sinkserve.client import SinkServeClient, generation_settings
from sinkserve.config import EngineConfig

from .conftest import SINKS, WINDOW
from .loopback import process_tree
from .test_local_stack_durability import Up, store_read, turn_until_served

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# shard killed -> health check fails -> Serve starts a new 2-shard replica (busy 2 cores): attempts 1 s apart
RECOVERY_ATTEMPTS = 300
SYSTEM = "be brief"
TURNS = ("hello there, tell me a story", "and then what happened next?")
TOKENS = 24  # per turn: two turns and their prompts pass the window (28), so the cache evicts


class TensorParallelUp(Up):
    extra_args = ("--tensor-parallel", "2", "--replica-cpus", "0.5", "--num-cpus", "2")

    @property
    def env(self) -> dict[str, str]:
        # Health checks every 2 s and short leases: the dead replica is found, replaced and its session re-homed
        # within the bound on this slow machine.
        return {**super().env, "SINKSERVE_REPLICA__HEALTH_CHECK_PERIOD_S": "2",
                "SINKSERVE_ROUTER__LEASE_TTL_S": "10"}

    def shard_pids(self) -> set[int]:
        """The pids of the stack's shard actors (rank 1 of each replica): Ray workers titled ray::ShardWorker."""
        found = set()
        for proc in process_tree(self.process.pid):
            try:
                if "ShardWorker" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                    found.add(proc.pid)
            except psutil.Error:
                pass
        return found


def wait_for(what: str, check, bound_s: float):
    deadline = time.monotonic() + bound_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound_s} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The unsharded engine with the stack's engine settings."""
    import torch

    from sinkserve.engine import load_engine

    torch.set_num_threads(1)
    engine = load_engine(EngineConfig(model=str(tiny_checkpoint), device="cpu", dtype="float32", sinks=SINKS,
                                      window=WINDOW, slots=2, num_threads=1))
    yield engine
    engine.close()


def reply(engine, sid: str, text: str, max_tokens: int = TOKENS) -> str:
    from sinkserve.protocol import GenerationParams

    return "".join(out.text for out in engine.chat(sid, text, GenerationParams(max_tokens=max_tokens)))


def transcript(defaults: dict[str, str], sid: str) -> list[bytes]:
    async def read(store):
        return await store.redis.lrange(store.keys.transcript(sid), 0, -1)

    return store_read(defaults, read)


def transcript_ends(defaults: dict[str, str], sid: str) -> tuple[list[int], int]:
    """What a replica rebuilding the session reads: the transcript's first sinks and last window ids, and its length."""

    async def read(store):
        return await store.sessions.transcript_ends(sid, SINKS, WINDOW)

    return store_read(defaults, read)


def test_sharded_replica_serves_like_one_process_and_survives_a_killed_shard(tiny_checkpoint, reference, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two shards need two CPUs")
    up = TensorParallelUp(tiny_checkpoint, tmp_path / "cache", tmp_path / "redis-data", tmp_path / "up.log")
    client = None
    try:
        up.start()
        defaults = up.defaults()
        (shard_pid,) = wait_for("one shard actor", up.shard_pids, 60)  # one replica: its rank 1 of 2
        api_key = up.cli("tenant", "create", "sharded").strip().splitlines()[-1]
        client = SinkServeClient(up.address, api_key)
        sid = client.create_session(system_prompt=SYSTEM).session_id

        # Greedy turns through the sharded replica equal the unsharded engine, through eviction.
        ref_sid = reference.open_session(system_prompt=SYSTEM)
        for number, text in enumerate(TURNS, 1):
            served, final = client.chat(sid, text, max_tokens=TOKENS, temperature=0.0)
            assert final.turn == number
            first_replica = final.replica
            assert served == reply(reference, ref_sid, text), f"turn {number}"
        view = reference.session_view(ref_sid)
        assert view.tokens_seen > view.cache_entries  # the window slid
        acknowledged = transcript(defaults, sid)
        assert len(acknowledged) == len(TURNS)
        ids, total = transcript_ends(defaults, sid)

        # Kill the shard mid-turn: the stream ends UNAVAILABLE after some deltas, and nothing is committed.
        long_text = "now a long one"
        from sinkserve.protocol import GenerationParams

        outputs = list(reference.chat(ref_sid, long_text, GenerationParams(max_tokens=400)))
        assert outputs[-1].completion_tokens > 100  # greedy runs on here (no early end of turn)
        stream = client.send_message(sid, long_text, generation_settings(max_tokens=400, temperature=0.0))
        deltas = 0
        with pytest.raises(grpc.RpcError) as ended:
            for event in stream:
                assert event.HasField("delta"), "the turn finished before the shard was killed"
                deltas += 1
                if deltas == 1:
                    os.kill(shard_pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
        assert "tensor-parallel shard" in ended.value.details()
        assert transcript(defaults, sid) == acknowledged

        # Serve replaces the replica (new shards); within the attempts the session's next turn is served, rebuilt
        # from the transcript, equal to the unsharded engine rebuilt from the same ends.
        served, final = turn_until_served(client, sid, "are you back?", RECOVERY_ATTEMPTS, max_tokens=TOKENS,
                                          pause_s=1)
        assert final.turn == len(TURNS) + 1
        assert final.replica != first_replica  # Serve replaced the replica that lost its shard
        print(f"\nshard killed after {deltas} delta(s): {ended.value.details()!r}; next turn served "
              f"{time.monotonic() - killed_at:.1f} s later")
        rebuilt = reference.import_session(None, ids, total_tokens=total)
        assert served == reply(reference, rebuilt, "are you back?")
        after = transcript(defaults, sid)
        assert after[: len(acknowledged)] == acknowledged and len(after) == len(acknowledged) + 1
        assert client.get_session(sid).turns == len(TURNS) + 1
        new_shards = wait_for("the new replica's shard actor", up.shard_pids, 60)
        assert shard_pid not in new_shards and len(new_shards) == 1
    finally:
        if client is not None:
            client.close()
        up.stop()
