"""The Redis state layer: sessions and their transcripts, ownership and leases, replica load, tenants.

Every gateway, request router and replica reads and writes the same Redis through a ``Store``, so they
agree on which replica owns each session. Imports only redis-py, the stdlib and ``sinkserve.config`` /
``sinkserve.errors`` (never torch, Ray or gRPC). The key layout is in ``keys.py``, the atomic steps in ``lua/``.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from sinkserve.config import LimitsConfig, RedisConfig
from sinkserve.store.client import connect
from sinkserve.store.conversations import Conversations
from sinkserve.store.keys import Keys
from sinkserve.store.ownership import Ownership
from sinkserve.store.replicas import LoadReport, Replicas
from sinkserve.store.sessions import SessionRecord, Sessions, TurnRecord
from sinkserve.store.tenants import Tenant, Tenants

__all__ = [
    "Keys", "LoadReport", "Ownership", "Replicas", "SessionRecord", "Sessions", "Store", "Tenant", "Tenants", "TurnRecord",
]


class Store:
    """One Redis client and key prefix, shared by the parts (build one per event loop)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "sinkserve", limits: LimitsConfig | None = None):
        self.redis = client
        self.keys = Keys(prefix)
        self.sessions = Sessions(client, self.keys)
        self.ownership = Ownership(client, self.keys)
        self.replicas = Replicas(client, self.keys)
        self.tenants = Tenants(client, self.keys, limits)
        self.conversations = Conversations(client, self.keys)

    @classmethod
    def from_config(cls, redis_cfg: RedisConfig, limits_cfg: LimitsConfig | None = None) -> "Store":
        return cls(connect(redis_cfg), redis_cfg.key_prefix, limits_cfg)

    async def ping(self) -> bool:
        """True when Redis answers; raises redis-py's error when it does not."""
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
