"""The replica's Ray launcher (replica/shards.py) with a real local Ray: shard actors pinned to the bundles of a
placement group join rank 0 (this process), give the logits of one process, and a shard killed with SIGKILL is
reported dead and makes the engine refuse with UNAVAILABLE."""

import functools
import os
import signal

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.errors import ShardLost
from sinkserve.replica.shards import RayShards

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray():
    if ray.is_initialized():  # a session-scoped local stack's cluster (tests/integration) is up: use it
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_shards_equal_one_process_and_a_killed_shard_is_seen(local_ray, tiny_checkpoint):
    torch.set_num_threads(1)
    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=120)
    config = EngineConfig(model=str(tiny_checkpoint), dtype="float32", sinks=4, window=16, slots=1, device="cpu",
                          num_threads=1)
    ids = list(range(100, 140))
    reference = load_engine(config).stream_logits(ids, chunk=8)
    launcher = functools.partial(RayShards, num_cpus=0.5, placement_group=group)
    engine = load_engine(config, tensor_parallel=2, launcher=launcher)
    try:
        assert float((engine.stream_logits(ids, chunk=8) - reference).abs().max()) < 1e-4
        shards = engine.runner.launcher
        assert shards.dead() is None
        (pid,) = shards.pids
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ShardLost):
            engine.stream_logits(ids[:4])
        ray.wait(shards.runs, timeout=60)
        assert "shard" in shards.dead()
    finally:
        engine.close()
        remove_placement_group(group)
    assert not torch.distributed.is_initialized()


async def test_a_replica_whose_shard_died_fails_its_health_check(local_ray, tiny_checkpoint, make_replica):
    """An idle replica (no call has failed yet) sees its shard actor's end: check_health raises, so Serve
    replaces it."""
    import asyncio

    torch.set_num_threads(1)
    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=120)
    config = EngineConfig(model=str(tiny_checkpoint), dtype="float32", sinks=4, window=16, slots=2, device="cpu",
                          num_threads=1)
    engine = load_engine(config, tensor_parallel=2,
                         launcher=functools.partial(RayShards, num_cpus=0.5, placement_group=group))
    try:
        replica = await make_replica(engine)
        await replica.check_health()  # healthy while every shard runs
        (pid,) = engine.runner.launcher.pids
        os.kill(pid, signal.SIGKILL)
        for _ in range(300):  # Ray reports the actor's end within moments; bounded by polls, not by time
            try:
                await replica.check_health()
            except RuntimeError as err:
                assert "tensor-parallel shard" in str(err)
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("check_health kept passing with a dead shard")
        replica.loop.stop()
    finally:
        engine.close()
        remove_placement_group(group)
