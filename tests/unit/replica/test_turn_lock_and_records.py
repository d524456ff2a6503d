"""The replica's side of issue 11 (no Ray; real Redis, real tiny engine): a turn whose gateway's session lock lapsed
stops and is recorded as cut; every recorded turn keeps its request id, reply text and usage; top_k beyond the
vocabulary is refused before anything changes."""

from __future__ import annotations

import asyncio

import pytest

from sinkserve.errors import Aborted, InvalidArgument
from sinkserve.protocol import GenerationParams, TurnDelta, TurnFinished
from sinkserve.replica.turns import LOCK_CHECK_S

pytestmark = pytest.mark.integration

ENDLESS = GenerationParams(max_tokens=1_000_000, ignore_eos=True)  # ended by the test, never by itself


async def new_session(replica) -> str:
    sid = (await replica.store.sessions.create_session("t", max_sessions=100)).session_id
    await replica.create(session_id=sid)
    return sid


async def test_a_turn_whose_lock_lapsed_stops_and_is_recorded_as_cut(make_engine, make_replica):
    """What a gateway killed mid-stream leaves: nobody reads the stream and nobody renews the lock. The turn stops
    once the lock lapses (the replica checks it every LOCK_CHECK_S), its slot is free for the next turn, and the
    cut turn is recorded under its request id with the text generated before the cut."""
    replica = await make_replica(make_engine(slots=2))
    store = replica.store
    sid = await new_session(replica)
    assert await store.sessions.try_lock_turn(sid, "turn-1", 60_000)
    stream = replica.chat(session_id=sid, text="go on", params=ENDLESS, turn_id="turn-1", request_id="req-1")
    streamed = []
    while len(streamed) < 3:
        event = await stream.__anext__()
        if isinstance(event, TurnDelta):
            streamed.append(event.text)
    await store.sessions.unlock_turn(sid, "turn-1")  # the lease lapsed

    async def drain():
        async for event in stream:
            if isinstance(event, TurnDelta):
                streamed.append(event.text)

    with pytest.raises(Aborted, match="gateway"):
        # an endless turn: without the lock check it never ends (wait_for only keeps a broken one from hanging)
        await asyncio.wait_for(drain(), timeout=LOCK_CHECK_S + 60)
    assert sid not in replica.turns.active
    recorded = await store.sessions.recorded_turn(sid, "req-1")
    assert recorded is not None and recorded.finish_reason == "aborted" and not recorded.finished
    assert recorded.turn == 1 and recorded.completion_tokens >= 3
    assert recorded.text.startswith("".join(streamed))  # every streamed piece, and what was cut off after
    assert await store.sessions.transcript_len(sid) == 1
    # The session is usable at once (no lock taken by another turn is needed to run: no turn_id here).
    events = [e async for e in replica.chat(session_id=sid, text="again", params=GenerationParams(max_tokens=4))]
    assert isinstance(events[-1], TurnFinished) and events[-1].turn == 2


async def test_a_lock_taken_by_another_turn_also_stops_the_old_one(make_engine, make_replica):
    replica = await make_replica(make_engine(slots=2))
    store = replica.store
    sid = await new_session(replica)
    assert await store.sessions.try_lock_turn(sid, "old", 60_000)
    stream = replica.chat(session_id=sid, text="go on", params=ENDLESS, turn_id="old")
    assert isinstance(await stream.__anext__(), TurnDelta)
    await store.sessions.unlock_turn(sid, "old")
    assert await store.sessions.try_lock_turn(sid, "new", 60_000)
    with pytest.raises(Aborted):
        async for _ in stream:
            pass
    assert (await store.sessions.last_turn(sid)).finish_reason == "aborted"


async def test_finished_turns_are_recorded_with_their_request_id_and_reply(make_engine, make_replica):
    replica = await make_replica(make_engine(slots=2))
    sid = await new_session(replica)
    events = [e async for e in replica.chat(session_id=sid, text="hello", params=GenerationParams(max_tokens=6),
                                             request_id="req-7")]
    final = events[-1]
    text = "".join(e.text for e in events if isinstance(e, TurnDelta)) + final.text
    recorded = await replica.store.sessions.recorded_turn(sid, "req-7")
    assert (recorded.turn, recorded.text, recorded.finish_reason) == (final.turn, text, final.finish_reason)
    assert (recorded.prompt_tokens, recorded.completion_tokens) == (final.prompt_tokens, final.completion_tokens)
    assert recorded.replica == replica.replica_id


async def test_top_k_beyond_the_vocabulary_is_refused_and_changes_nothing(make_engine, make_replica):
    engine = make_engine(slots=2)
    replica = await make_replica(engine)
    sid = await new_session(replica)
    vocab = engine.runner.vocab_size
    with pytest.raises(InvalidArgument, match=f"vocabulary size \\({vocab}\\)"):
        async for _ in replica.chat(session_id=sid, text="hi", params=GenerationParams(max_tokens=3, top_k=vocab + 1)):
            pass
    assert await replica.store.sessions.transcript_len(sid) == 0
    events = [e async for e in replica.chat(session_id=sid, text="hi", params=GenerationParams(max_tokens=3,
                                                                                                 top_k=vocab))]
    assert events[-1].turn == 1
