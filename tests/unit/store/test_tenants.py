"""Tenants, hashed API keys and the tokens-per-minute counter (real redis-server)."""

from __future__ import annotations

import asyncio

import pytest

from sinkserve.config import LimitsConfig, RedisConfig
from sinkserve.errors import TenantError
from sinkserve.store import Store


async def test_create_authenticate_and_revoke(store):
    tenant, key = await store.tenants.create("acme", max_sessions=5, tokens_per_minute=100)
    assert (tenant.name, tenant.max_sessions, tenant.tokens_per_minute) == ("acme", 5, 100)
    assert await store.tenants.authenticate(key) == tenant
    second = await store.tenants.add_key("acme")
    assert second != key and (await store.tenants.authenticate(second)).name == "acme"
    assert await store.tenants.authenticate("sk-ss-not-a-key") is None
    assert [t.name for t in await store.tenants.list()] == ["acme"]
    assert await store.tenants.delete("acme")
    assert await store.tenants.authenticate(key) is None and await store.tenants.authenticate(second) is None
    assert await store.tenants.get("acme") is None and await store.tenants.list() == []
    assert not await store.tenants.delete("acme")


async def test_keys_are_stored_only_as_digests(store):
    _, key = await store.tenants.create("acme")
    names = [name async for name in store.redis.scan_iter(match=f"{store.keys.prefix}*")]
    values = [await store.redis.get(n) for n in names if await store.redis.type(n) == b"string"]
    assert names and not any(key.encode() in item for item in names + values if item)


async def test_refusals(store):
    for bad in ("", "Acme", "-acme", "a:b", "x" * 64):
        with pytest.raises(TenantError):
            await store.tenants.create(bad)
    await store.tenants.create("acme")
    with pytest.raises(TenantError, match="already exists"):
        await store.tenants.create("acme")
    with pytest.raises(TenantError, match="no tenant"):
        await store.tenants.add_key("nobody")
    with pytest.raises(TenantError):
        await store.tenants.create("zero", max_sessions=0)


async def test_quotas_default_to_the_limits_config(redis_server):
    limits = LimitsConfig(max_sessions=7, tokens_per_minute=70)
    store = Store.from_config(RedisConfig(url=redis_server.url, key_prefix="unit-limits"), limits)
    try:
        tenant, _ = await store.tenants.create("acme")
        assert (tenant.max_sessions, tenant.tokens_per_minute) == (7, 70)
    finally:
        await store.close()


async def test_recorded_turns_are_charged_to_the_tenant(store):
    await store.tenants.create("acme")
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    assert await store.tenants.tokens_used("acme") == 0
    if store.tenants.seconds_to_next_window() < 1:  # charge and read in the same one-minute window
        await asyncio.sleep(store.tenants.seconds_to_next_window())
    await store.sessions.append_transcript(sid, "replica-a", 1, [1, 2], count_turn=True, tenant="acme", charge_tokens=9)
    await store.sessions.append_transcript(sid, "replica-a", 1, [3], count_turn=True)  # no tenant: not charged
    assert await store.tenants.tokens_used("acme") == 9
    assert 0 < store.tenants.seconds_to_next_window() <= 60


async def test_a_recorded_turn_settles_its_reservation_in_the_same_step(store):
    """The charge is the turn's actual tokens, at most what it reserved (a rebuild's re-ingest, counted by the
    engine as prompt, is not the tenant's doing), and the reservation goes in the same atomic step."""
    from sinkserve.store import TurnRecord

    await store.tenants.create("acme", tokens_per_minute=1000)
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    if store.tenants.seconds_to_next_window() < 2:
        await asyncio.sleep(store.tenants.seconds_to_next_window())
    for turn_id, actual in (("t1", 30), ("t2", 500)):
        assert (await store.tenants.reserve_tokens("acme", turn_id, 100, 1000, 10_000)).granted
        record = TurnRecord("", "x", "eos", actual - 1, 1, "replica-a", turn_id=turn_id)
        await store.sessions.append_transcript(sid, "replica-a", 1, [1], count_turn=True, tenant="acme",
                                               charge_tokens=actual, turn=record)
        assert await store.tenants.tokens_reserved("acme") == 0
    assert await store.tenants.tokens_used("acme") == 30 + 100
    # No reservation (a turn without a gateway's): charged in full.
    await store.sessions.append_transcript(sid, "replica-a", 1, [1], count_turn=True, tenant="acme", charge_tokens=7,
                                           turn=TurnRecord("", "x", "eos", 6, 1, "replica-a"))
    assert await store.tenants.tokens_used("acme") == 137
