"""Replica load as the routers see it: each replica's latest load report and the sessions it owns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from sinkserve.store.client import now_ms
from sinkserve.store.keys import Keys


@dataclass
class LoadReport:
    """What a replica publishes about itself every heartbeat (routers place new sessions by it)."""

    replica_id: str
    sessions: int = 0  # sessions resident in the engine's slab
    owned: int = 0  # sessions the registry assigns to this replica
    free_slots: int = 0
    slots: int = 0  # KV slots of the replica's engine
    queue: int = 0  # turns running or waiting in the engine
    draining: bool = False
    model: str = ""
    parked: int = 0  # idle sessions whose cache waits in host memory
    parks: int = 0  # counts since the replica started
    unparks: int = 0
    drops: int = 0  # parked caches dropped for the host budget
    rebuilt: int = 0  # caches rebuilt from transcripts
    waiting: int = 0  # turns waiting for a slot now
    steps: int = 0  # engine steps run
    pid: int = 0
    refused_early: int = 0  # turns refused at once: they could not start before their deadline
    # Where the engine thread's time went since the replica started (seconds) and what its steps held.
    decode_rows: int = 0
    prefill_tokens: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0
    output_s: float = 0.0
    step_other_s: float = 0.0
    deliver_s: float = 0.0
    commands: int = 0
    commands_s: float = 0.0
    idle_s: float = 0.0
    # Where its turns spent their time (seconds, summed over finished turns).
    turns: int = 0
    queue_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    completion_tokens: int = 0  # new tokens of those turns
    commit_s: float = 0.0
    rebuild_read_s: float = 0.0
    reported_ms: int = 0
    # The dtype, weights and kernels the engine chose at start, and the CPU it chose them for
    # (engine/capability.py ExecutionPaths.as_dict()); empty for an engine built by hand.
    engine_paths: dict = field(default_factory=dict)


class Replicas:
    def __init__(self, client: aioredis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys

    async def report_load(self, report: LoadReport, ttl_ms: int) -> None:
        """Publish the report; it lapses after ``ttl_ms`` unless the replica reports again."""
        report.reported_ms = now_ms()
        await self.redis.set(
            self.keys.replica_report(report.replica_id), json.dumps(asdict(report)), px=max(1, int(ttl_ms))
        )

    async def drop_report(self, replica_id: str) -> None:
        await self.redis.delete(self.keys.replica_report(replica_id))

    async def loads(self, replica_ids: list[str]) -> dict[str, tuple[int, LoadReport | None]]:
        """{replica: (sessions it owns in the registry, its latest live load report or None)}."""
        pipe = self.redis.pipeline(transaction=False)
        for rid in replica_ids:
            pipe.scard(self.keys.replica_owned(rid))
            pipe.get(self.keys.replica_report(rid))
        raw = await pipe.execute()
        out: dict[str, tuple[int, LoadReport | None]] = {}
        for i, rid in enumerate(replica_ids):
            owned, report = raw[2 * i], raw[2 * i + 1]
            out[rid] = (int(owned), LoadReport(**json.loads(report)) if report else None)
        return out

    async def owned_by(self, replica_id: str) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(self.keys.replica_owned(replica_id))}
