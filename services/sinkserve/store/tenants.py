"""Tenants, their API keys (stored only as SHA-256 digests) and their quotas.

Keys are 256-bit random tokens, so a plain SHA-256 digest is enough: there is nothing to brute-force,
and lookups stay O(1) on every request.

Quotas, each enforced atomically in Redis (Lua) so that every gateway shares them:

- **tokens per minute**, in fixed one-minute windows. A turn reserves its worst case before it starts
  (``reserve_tokens``: refused when used + reserved + worst > limit). The replica charges the turn's actual tokens
  (as the engine counts them), at most its reservation, and releases the reservation in the same atomic step as it
  records the turn (``Sessions.append_transcript``); the gateway releases it after the turn anyway
  (``release_tokens``: a turn that was never recorded). A turn is charged once and its reservation counts until
  then, so the tokens charged in a minute never exceed the limit. Reservations are leases the turn's gateway
  renews: one whose gateway died lapses after the lease instead of holding the quota.
- **requests per second**, a token bucket per tenant (``take_request``: rate and burst from the tenant record).
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
from sinkserve.store import scripts
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
    requests_per_second: float = LimitsConfig.model_fields["requests_per_second"].default
    request_burst: int = LimitsConfig.model_fields["request_burst"].default
    created_ms: int = 0


@dataclass(frozen=True)
class Reservation:
    """The answer of ``reserve_tokens``: whether the worst case fit, and what the minute held besides it."""

    granted: bool
    used: int  # tokens charged this minute
    reserved: int  # tokens reserved by other turns in flight


def _number(value: bytes | None, default: float) -> float:
    return float(value) if value is not None else default


class Tenants:
    def __init__(self, client: aioredis.Redis, keys: Keys, limits: LimitsConfig | None = None):
        self.redis = client
        self.keys = keys
        self.limits = limits or LimitsConfig()
        self._reserve = scripts.register(client, "reserve_tokens")
        self._renew_tokens = scripts.register(client, "renew_tokens")
        self._take_request = scripts.register(client, "take_request")

    async def create(
        self,
        name: str,
        max_sessions: int | None = None,
        tokens_per_minute: int | None = None,
        requests_per_second: float | None = None,
        request_burst: int | None = None,
    ) -> tuple[Tenant, str]:
        """Create a tenant with one fresh API key; returns the tenant and the key (shown once, never stored).
        A quota left None takes the limits config's default."""
        if not TENANT_NAME.match(name):
            raise TenantError(
                f"bad tenant name {name!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
            )
        pick = lambda given, default: given if given is not None else default  # noqa: E731
        tenant = Tenant(
            name=name,
            max_sessions=pick(max_sessions, self.limits.max_sessions),
            tokens_per_minute=pick(tokens_per_minute, self.limits.tokens_per_minute),
            requests_per_second=float(pick(requests_per_second, self.limits.requests_per_second)),
            request_burst=pick(request_burst, self.limits.request_burst),
            created_ms=now_ms(),
        )
        if tenant.max_sessions < 1 or tenant.tokens_per_minute < 1 or tenant.request_burst < 1:
            raise TenantError("max_sessions, tokens_per_minute and request_burst must be >= 1")
        if not tenant.requests_per_second > 0 or tenant.requests_per_second == float("inf"):
            raise TenantError("requests_per_second must be a number > 0")
        added = await self.redis.sadd(self.keys.tenants(), name)
        if not added:
            raise TenantError(f"tenant {name!r} already exists")
        await self.redis.hset(
            self.keys.tenant(name),
            mapping={
                "name": name,
                "max_sessions": tenant.max_sessions,
                "tokens_per_minute": tenant.tokens_per_minute,
                "requests_per_second": repr(tenant.requests_per_second),
                "request_burst": tenant.request_burst,
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
        return Tenant(  # a tenant created before a quota existed gets the limits config's default for it
            name=raw[b"name"].decode(),
            max_sessions=int(raw[b"max_sessions"]),
            tokens_per_minute=int(raw[b"tokens_per_minute"]),
            requests_per_second=_number(raw.get(b"requests_per_second"), self.limits.requests_per_second),
            request_burst=int(_number(raw.get(b"request_burst"), self.limits.request_burst)),
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
        pipe.delete(self.keys.tenant(name), self.keys.tenant_keys(name), self.keys.tokens_reserved(name),
                    self.keys.request_bucket(name))
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

    async def tokens_reserved(self, name: str) -> int:
        """Tokens reserved now by the tenant's turns in flight (leases not yet lapsed)."""
        entries = await self.redis.hgetall(self.keys.tokens_reserved(name))
        now = now_ms()
        total = 0
        for value in entries.values():
            amount, _, expiry = value.decode().partition("|")
            total += int(amount) if int(expiry) > now else 0
        return total

    async def reserve_tokens(self, name: str, turn_id: str, worst: int, limit: int, lease_ms: int) -> Reservation:
        """Reserve `worst` tokens for a turn if used + reserved + worst <= limit, atomically; the reservation
        lapses after `lease_ms` unless renewed (``renew_tokens``)."""
        granted, used, reserved = await self._reserve(
            keys=[self.keys.tokens_per_minute(name, time.time()), self.keys.tokens_reserved(name)],
            args=[turn_id, int(worst), int(limit), max(1, int(lease_ms))],
        )
        return Reservation(bool(granted), int(used), int(reserved))

    async def renew_tokens(self, name: str, turn_id: str, lease_ms: int) -> bool:
        keys = [self.keys.tokens_reserved(name)]
        return bool(await self._renew_tokens(keys=keys, args=[turn_id, max(1, int(lease_ms))]))

    async def release_tokens(self, name: str, turn_id: str) -> None:
        await self.redis.hdel(self.keys.tokens_reserved(name), turn_id)

    @staticmethod
    def seconds_to_next_window() -> float:
        return 60 - (time.time() % 60)

    # ---- requests per second
    async def take_request(self, tenant: Tenant) -> float | None:
        """Take one request from the tenant's token bucket: None when allowed, else seconds until one is there."""
        allowed, wait_ms = await self._take_request(
            keys=[self.keys.request_bucket(tenant.name)],
            args=[repr(float(tenant.requests_per_second)), tenant.request_burst],
        )
        return None if allowed else max(0.001, int(wait_ms) / 1000)
