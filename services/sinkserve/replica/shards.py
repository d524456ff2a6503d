"""The replica's tensor-parallel shards as Ray actors: ranks 1..N-1, one per bundle of the replica's own
placement group (Serve's placement_group_bundles; bundle 0 holds the replica, which is rank 0 and runs the
engine). Each actor is pinned to its bundle (and its GPU, when the bundle has one) and runs
engine.shards.run_shard until rank 0 says stop; rendezvous is on this node's own address."""

from __future__ import annotations

import os
from pathlib import Path

import ray
import torch
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sinkserve.engine import shards


class ShardWorker:
    """One shard (rank > 0). Two concurrent calls: run() holds one for its whole life, pid() answers meanwhile."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, *args) -> None:
        shards.run_shard(*args)


class RayShards:
    """Launcher of the other ranks for engine.load_engine(launcher=...): same interface as shards.LocalShards."""

    def __init__(self, world: int, checkpoint: Path, dtype: str, device: torch.device, num_threads: int | None,
                 vocab_parallel: bool = True, num_cpus: float = 1, num_gpus: float = 0, placement_group=None):
        self.world = world
        host = ray.util.get_node_ip_address()
        port = shards.free_port(host)
        group = placement_group or get_current_placement_group()  # the replica's own, inside Serve
        worker = ray.remote(ShardWorker)
        self.actors = []
        for rank in range(1, world):
            options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=2)
            if group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group,
                                                                                  placement_group_bundle_index=rank)
            self.actors.append(worker.options(**options).remote())
        self.runs = [actor.run.remote(rank, world, host, port, str(checkpoint), dtype, str(device), num_threads,
                                      False, vocab_parallel) for rank, actor in enumerate(self.actors, 1)]
        try:
            shards.join_group(0, world, host, port, shards.shard_device(device, 0, local=False))
        except Exception:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self.actors], timeout=30)

    def dead(self) -> str | None:
        """Why a shard is gone (its run() ended or its actor died), or None while every one runs."""
        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0], timeout=1)
            return "a tensor-parallel shard stopped"
        except Exception as err:  # noqa: BLE001 - RayActorError and the like: the reason is the message
            return f"a tensor-parallel shard died: {type(err).__name__}"

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def close(self) -> None:
        try:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=30)
        finally:
            self.kill()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
