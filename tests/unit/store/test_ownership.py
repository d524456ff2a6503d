"""Claims, fencing, leases and release (real redis-server)."""

from __future__ import annotations

import asyncio

import pytest

from sinkserve.errors import Fenced, SessionNotFound


async def test_claims_fence_the_previous_owner(store):
    record = await store.sessions.create_session("acme", max_sessions=10)
    sid = record.session_id
    assert await store.ownership.claim(sid, 0, "replica-a", 10_000) == (1, "replica-a")
    assert await store.ownership.claim(sid, 0, "replica-b", 10_000) == (1, "replica-a")  # stale epoch loses
    assert await store.sessions.append_transcript(sid, "replica-a", 1, [1, 2, 3], count_turn=True) == 1
    assert await store.ownership.claim(sid, 1, "replica-b", 10_000) == (2, "replica-b")
    with pytest.raises(Fenced):
        await store.sessions.append_transcript(sid, "replica-a", 1, [4], count_turn=True)
    assert await store.ownership.renew("replica-a", {sid: 1}, 10_000) == {sid: 0}
    assert await store.ownership.renew("replica-b", {sid: 2}, 10_000) == {sid: 1}
    assert await store.replicas.owned_by("replica-a") == set()
    assert await store.replicas.owned_by("replica-b") == {sid}
    assert await store.sessions.transcript(sid) == [[1, 2, 3]]
    assert (await store.sessions.get_session(sid)).turns == 1


async def test_release_and_delete(store):
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    await store.ownership.release("replica-a", {sid: 1})
    record = await store.sessions.get_session(sid)
    assert record.owner == "" and record.epoch == 1 and not await store.ownership.lease_alive(sid)
    assert await store.replicas.owned_by("replica-a") == set()
    await store.ownership.claim(sid, 1, "replica-b", 10_000)
    assert await store.sessions.delete_session(sid, "acme")
    with pytest.raises(SessionNotFound):
        await store.sessions.get_session(sid)
    with pytest.raises(SessionNotFound):
        await store.sessions.append_transcript(sid, "replica-b", 2, [1], count_turn=True)
    assert await store.ownership.claim(sid, 2, "replica-b", 10_000) == (-1, "")
    assert await store.replicas.owned_by("replica-b") == set()
    assert await store.sessions.count_sessions("acme") == 0


async def test_leases_lapse_and_only_the_owner_renews_or_releases(store):
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    assert await store.ownership.renew("replica-a", {}, 10_000) == {}
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    assert await store.ownership.lease_alive(sid)
    await store.ownership.release("replica-b", {sid: 1})  # not the owner: nothing changes
    assert (await store.sessions.get_session(sid)).owner == "replica-a"
    assert await store.ownership.renew("replica-a", {sid: 1}, 1) == {sid: 1}  # renewed with a 1 ms lease
    for _ in range(100):
        if not await store.ownership.lease_alive(sid):
            break
        await asyncio.sleep(0.01)
    assert not await store.ownership.lease_alive(sid)
    await store.sessions.delete_session(sid, "acme")
    assert await store.ownership.renew("replica-a", {sid: 1}, 10_000) == {sid: -1}
