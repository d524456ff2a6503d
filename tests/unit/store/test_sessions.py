"""Session records, the turn lock and the transcript (real redis-server)."""

from __future__ import annotations

import asyncio

import pytest

from sinkserve.errors import Fenced, InvalidArgument, SessionExists, SessionNotFound, TenantSessionLimit
from sinkserve.store import TurnRecord
from sinkserve.store.sessions import RECENT_TURNS, message_digest


async def _owned_session(store, tenant: str = "acme") -> str:
    sid = (await store.sessions.create_session(tenant, max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    return sid


async def test_create_and_read_back(store):
    record = await store.sessions.create_session(
        "acme", max_sessions=10, system_prompt="be brief", defaults={"temperature": 0.5}, labels={"k": "v"}
    )
    again = await store.sessions.get_session(record.session_id)
    assert again == record
    assert (record.tenant, record.system_prompt, record.defaults, record.labels) == (
        "acme", "be brief", {"temperature": 0.5}, {"k": "v"}
    )  # fmt: skip
    assert (record.turns, record.tokens_seen, record.owner, record.epoch) == (0, 0, "", 0)


FIXED = "f1" * 16


async def test_a_taken_session_id_is_refused_and_left_alone(store):
    await store.sessions.create_session("acme", max_sessions=10, session_id=FIXED, system_prompt="first")
    with pytest.raises(SessionExists):
        await store.sessions.create_session("acme", max_sessions=10, session_id=FIXED, system_prompt="second")
    assert (await store.sessions.get_session(FIXED)).system_prompt == "first"
    assert await store.sessions.count_sessions("acme") == 1


async def test_tenant_session_limit_is_atomic(store):
    results = await asyncio.gather(
        *(store.sessions.create_session("busy", max_sessions=3) for _ in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert all(isinstance(r, TenantSessionLimit) for r in results if isinstance(r, Exception))


async def test_list_pages_oldest_first_and_skips_deleted(store):
    sids = []
    for _ in range(5):
        sids.append((await store.sessions.create_session("acme", max_sessions=10)).session_id)
        await asyncio.sleep(0.002)  # distinct creation times: the order is by creation
    pages, cursor = [], ""
    while True:
        ids, cursor = await store.sessions.list_sessions("acme", 2, cursor)
        pages.append(ids)
        if not cursor:
            break
    assert [len(p) for p in pages] == [2, 2, 1] and sum(pages, []) == sids
    assert await store.sessions.delete_session(sids[1], "acme")
    assert not await store.sessions.delete_session(sids[1], "acme")  # already gone
    assert (await store.sessions.list_sessions("acme", 10))[0] == sids[:1] + sids[2:]
    records = await store.sessions.get_sessions([sids[0], sids[1]])
    assert records[0].session_id == sids[0] and records[1] is None
    with pytest.raises(SessionNotFound):
        await store.sessions.get_session(sids[1])


async def test_one_turn_at_a_time(store):
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    assert not await store.sessions.is_busy(sid)
    assert await store.sessions.try_lock_turn(sid, "turn-1", 10_000)
    assert not await store.sessions.try_lock_turn(sid, "turn-2", 10_000)
    await store.sessions.unlock_turn(sid, "turn-2")  # not its lock: nothing happens
    assert await store.sessions.is_busy(sid)
    await store.sessions.unlock_turn(sid, "turn-1")
    assert not await store.sessions.is_busy(sid)
    assert await store.sessions.try_lock_turn(sid, "turn-2", 10_000)


async def test_append_counts_turns_and_tokens(store):
    sid = await _owned_session(store)
    assert await store.sessions.append_transcript(sid, "replica-a", 1, [1, 2, 3], count_turn=True) == 1
    assert await store.sessions.append_transcript(sid, "replica-a", 1, [4, 5], count_turn=False) == 1
    record = await store.sessions.get_session(sid)
    assert (record.turns, record.tokens_seen) == (1, 5)
    assert await store.sessions.transcript(sid) == [[1, 2, 3], [4, 5]]
    assert await store.sessions.transcript_len(sid) == 2


async def test_transcript_ends_read_only_what_a_rebuild_needs(store):
    sid = await _owned_session(store)
    entries = [list(range(i * 10, i * 10 + 10)) for i in range(50)]  # 500 tokens, 10 per entry
    for entry in entries:
        await store.sessions.append_transcript(sid, "replica-a", 1, entry, count_turn=True)
    flat = [t for e in entries for t in e]
    ids, total = await store.sessions.transcript_ends(sid, 4, 25)
    assert total == 500
    assert ids == flat[:10] + flat[-30:]  # whole entries: one from the front, three from the back
    ids, total = await store.sessions.transcript_ends(sid, 0, 10)  # no sinks (window policy)
    assert (ids, total) == (flat[-10:], 500)
    ids, total = await store.sessions.transcript_ends(sid, 250, 300)  # the ends meet: the whole log, once
    assert (ids, total) == (flat, 500)
    ids, total = await store.sessions.transcript_ends(sid, 0, 0)  # nothing asked: still the length
    assert (ids, total) == ([], 500)


async def test_transcript_ends_of_short_logs(store):
    sid = await _owned_session(store)
    assert await store.sessions.transcript_ends(sid, 4, 28) == ([], 0)  # empty log
    long_entry = list(range(100))
    await store.sessions.append_transcript(sid, "replica-a", 1, long_entry, count_turn=True)
    # One entry covers both ends: it is returned once, and the length is exact.
    assert await store.sessions.transcript_ends(sid, 4, 28) == (long_entry, 100)
    await store.sessions.append_transcript(sid, "replica-a", 1, [7], count_turn=True)
    assert await store.sessions.transcript_ends(sid, 4, 1) == (long_entry + [7], 101)


async def test_only_ids_of_the_server_form_reach_redis(store):
    """`<sid>:tx` names the transcript list: read as a session it would be WRONGTYPE. Every Sessions call refuses
    an id that is not 32 lowercase hex digits with the NOT_FOUND of an unknown session, before any Redis call."""
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    await store.sessions.append_transcript(sid, "replica-a", 1, [1, 2], count_turn=True)
    assert await store.sessions.try_lock_turn(sid, "turn", 10_000)
    head = store.keys.session(sid)[: -len(sid)]
    keys = store.keys
    key_named = [k.removeprefix(head) for k in (keys.transcript(sid), keys.lease(sid), keys.busy(sid))]
    assert key_named[0] == sid + ":" + "tx"
    for bad in (*key_named, "", "x" * 1000, sid.upper(), sid[:31], "../" + sid):
        for call in (
            lambda: store.sessions.get_session(bad),
            lambda: store.sessions.delete_session(bad, "acme"),
            lambda: store.sessions.try_lock_turn(bad, "t", 1000),
            lambda: store.sessions.append_transcript(bad, "replica-a", 1, [3], count_turn=True),
            lambda: store.sessions.transcript(bad),
            lambda: store.sessions.recent_turns(bad),
            lambda: store.ownership.claim(bad, 1, "replica-b", 1000),
        ):
            with pytest.raises(SessionNotFound, match="not found"):
                await call()
        with pytest.raises(InvalidArgument):
            await store.sessions.create_session("acme", max_sessions=10, session_id=bad or "-")
    assert await store.sessions.get_sessions([key_named[0], sid]) == [None, await store.sessions.get_session(sid)]
    assert await store.sessions.transcript(sid) == [[1, 2]] and await store.sessions.turn_holder(sid) == "turn"


async def test_each_recorded_turn_keeps_its_result_with_the_transcript_entry(store):
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    assert await store.sessions.last_turn(sid) is None
    first = TurnRecord("req-1", "Hé, \"quoted\" | piped \U0001f600", "eos", 4, 3, "replica-a", message_digest("hi"))
    assert await store.sessions.append_transcript(sid, "replica-a", 1, [1, 2], count_turn=True, turn=first) == 1
    got = await store.sessions.recorded_turn(sid, "req-1")
    assert got == TurnRecord(**{**first.__dict__, "turn": 1}) and got.finished
    cut = TurnRecord("", "partial", "aborted", 4, 1, "replica-a")
    await store.sessions.append_transcript(sid, "replica-a", 1, [3], count_turn=True, turn=cut)
    last = await store.sessions.last_turn(sid)
    assert (last.turn, last.text, last.finished) == (2, "partial", False)
    assert await store.sessions.recorded_turn(sid, "") is None  # no id, nothing to find by
    # A fenced append records nothing.
    with pytest.raises(Fenced):
        await store.sessions.append_transcript(sid, "replica-b", 1, [4], count_turn=True, turn=first)
    assert len(await store.sessions.recent_turns(sid)) == 2
    for i in range(RECENT_TURNS + 3):
        record = TurnRecord(f"req-{i + 10}", "x", "length", 1, 1, "replica-a")
        await store.sessions.append_transcript(sid, "replica-a", 1, [5], count_turn=True, turn=record)
    recent = await store.sessions.recent_turns(sid)
    assert len(recent) == RECENT_TURNS and recent[0].request_id == f"req-{RECENT_TURNS + 12}"
    assert await store.sessions.recorded_turn(sid, "req-1") is None  # older than the last RECENT_TURNS
    assert await store.sessions.delete_session(sid, "acme")
    assert not await store.redis.exists(store.keys.recent_turns(sid))
