"""Tenants, their API keys (stored only as SHA-256 digests) and their quotas.

Keys are 256-bit random tokens, so a plain SHA-256 digest is enough: there is nothing to brute-force,
and lookups stay O(1) on every request. Tokens per minute are counted in fixed one-minute windows; the
replica charges them when it records a turn (``Sessions.append_transcript``), this module only reads them.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from sinkserve.config import LimitsConfig
from sinkserve.errors import TenantError
from sinkserve.store.client import now_ms
from sinkserve.store.keys import Keys

KEY_PREFIX = "sk-ss-"
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass
class Tenant:
    name: str
    max_sessions: int
    tokens_per_minute: int
    created_ms: int = 0


class Tenants:
    def __init__(self, client: aioredis.Redis, keys: Keys, limits: LimitsConfig | None = None):
        self.redis = client
        self.keys = keys
        self.limits = limits or LimitsConfig()

    async def create(
        self, name: str, max_sessions: int | None = None, tokens_per_minute: int | None = None
    ) -> tuple[Tenant, str]:
        """Create a tenant with one fresh API key; returns the tenant and the key (shown once, never stored)."""
        if not TENANT_NAME.match(name):
            raise TenantError(
                f"bad tenant name {name!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
            )
        tenant = Tenant(
            name=name,
            max_sessions=max_sessions if max_sessions is not None else self.limits.max_sessions,
            tokens_per_minute=tokens_per_minute if tokens_per_minute is not None else self.limits.tokens_per_minute,
            created_ms=now_ms(),
        )
        if tenant.max_sessions < 1 or tenant.tokens_per_minute < 1:
            raise TenantError("max_sessions and tokens_per_minute must be >= 1")
        added = await self.redis.sadd(self.keys.tenants(), name)
        if not added:
            raise TenantError(f"tenant {name!r} already exists")
        await self.redis.hset(
            self.keys.tenant(name),
            mapping={
                "name": name,
                "max_sessions": tenant.max_sessions,
                "tokens_per_minute": tenant.tokens_per_minute,
                "created_ms": tenant.created_ms,
            },
        )
        return tenant, await self.add_key(name)

    async def add_key(self, name: str) -> str:
        """Issue another API key for the tenant; returns it (only its digest is stored)."""
        if not await self.redis.sismember(self.keys.tenants(), name):
            raise TenantError(f"no tenant {name!r}")
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_digest = digest(api_key)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.api_key(key_digest), name)
        pipe.sadd(self.keys.tenant_keys(name), key_digest)
        await pipe.execute()
        return api_key

    async def get(self, name: str) -> Tenant | None:
        raw = await self.redis.hgetall(self.keys.tenant(name))
        if not raw:
            return None
        return Tenant(
            name=raw[b"name"].decode(),
            max_sessions=int(raw[b"max_sessions"]),
            tokens_per_minute=int(raw[b"tokens_per_minute"]),
            created_ms=int(raw.get(b"created_ms", b"0")),
        )

    async def list(self) -> list[Tenant]:
        names = sorted(n.decode() for n in await self.redis.smembers(self.keys.tenants()))
        return [t for t in [await self.get(n) for n in names] if t is not None]

    async def delete(self, name: str) -> bool:
        """Delete a tenant and revoke its keys. Its sessions must be deleted first (the caller does that)."""
        digests = await self.redis.smembers(self.keys.tenant_keys(name))
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(self.keys.tenants(), name)
        for key_digest in digests:
            pipe.delete(self.keys.api_key(key_digest.decode()))
        pipe.delete(self.keys.tenant(name), self.keys.tenant_keys(name))
        results = await pipe.execute()
        return bool(results[0])

    async def authenticate(self, api_key: str) -> Tenant | None:
        """The key's tenant, or None for an unknown or revoked key."""
        name = await self.redis.get(self.keys.api_key(digest(api_key)))
        if name is None:
            return None
        return await self.get(name.decode())

    # ---- tokens per minute
    async def tokens_used(self, name: str) -> int:
        """Tokens charged to the tenant in the current minute."""
        value = await self.redis.get(self.keys.tokens_per_minute(name, time.time()))
        return int(value or 0)

    @staticmethod
    def seconds_to_next_window() -> float:
        return 60 - (time.time() % 60)
