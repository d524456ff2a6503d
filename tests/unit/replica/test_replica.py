"""The replica without Ray: slots, parking, rebuilds, fencing, admission, cancellation, health, shutdown."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from sinkserve.errors import NotOwner, ResourceExhausted, SinkServeError
from sinkserve.protocol import GenerationParams, TurnDelta, TurnFinished
from sinkserve.replica.loop import Snapshot

pytestmark = pytest.mark.integration

GREEDY = GenerationParams(max_tokens=12, ignore_eos=True)
ENDLESS = GenerationParams(max_tokens=1_000_000, ignore_eos=True)  # ended by the test, never by itself


async def turn(replica, sid: str, text: str, params: GenerationParams = GREEDY, deadline_unix=None) -> list:
    return [e async for e in replica.chat(session_id=sid, text=text, params=params, deadline_unix=deadline_unix)]


def reply(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TurnDelta)) + events[-1].text


async def new_sessions(replica, n: int) -> list[str]:
    sids = [(await replica.store.sessions.create_session("t", max_sessions=100)).session_id for _ in range(n)]
    for sid in sids:
        await replica.create(session_id=sid)
    return sids


def assert_slots_accounted(engine) -> None:
    """Every slot is free or held by exactly one known session: nothing leaked."""
    resident = engine.residency.resident()
    assert engine.free_slots + len(resident) == engine.slots
    assert set(resident) | set(engine.residency.parked()) <= set(engine.sessions.ids())


@dataclass(frozen=True)
class Hold:
    """A command that keeps the engine thread busy until released (to queue work behind it)."""

    entered: threading.Event
    release: threading.Event

    def run(self, engine, loop) -> None:
        self.entered.set()
        self.release.wait(30)


async def hold_engine(replica) -> tuple[threading.Event, asyncio.Future]:
    entered, release = threading.Event(), threading.Event()
    held = replica.loop.submit(Hold(entered, release))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    return release, held


async def test_rebuilds_fencing_health_and_graceful_shutdown(make_engine, make_replica):
    # No host memory for parking: an idle session that loses its slot is dropped and rebuilt from its log.
    engine = make_engine(slots=2, park_host_bytes=0)
    replica = await make_replica(engine)
    store = replica.store
    sids = await new_sessions(replica, 3)
    for sid in sids:  # three sessions through two slots: the idle LRU one is dropped, then rebuilt
        events = await turn(replica, sid, "hello")
        assert isinstance(events[-1], TurnFinished) and events[-1].turn == 1
    assert engine.residency.stats.drops >= 1
    events = await turn(replica, sids[0], "again")
    assert events[-1].turn == 2 and replica.turns.rebuilt >= 1
    # Two turns at once on sessions that are not resident: each takes an idle session's slot, none fails.
    finals = await asyncio.gather(turn(replica, sids[1], "together"), turn(replica, sids[2], "together"))
    assert [f[-1].turn for f in finals] == [2, 2]
    assert set(engine.residency.resident()) == {sids[1], sids[2]}
    assert_slots_accounted(engine)

    # Another replica claims sids[1]: this one may no longer serve or record turns for it.
    record = await store.sessions.get_session(sids[1])
    await store.ownership.claim(sids[1], record.epoch, "someone-else", 10_000)
    with pytest.raises(NotOwner):
        await turn(replica, sids[1], "mine?")
    assert await store.sessions.transcript_len(sids[1]) == 2
    assert not engine.has_session(sids[1])  # its cache was dropped at once

    await replica.check_health()
    report = await replica.stats()
    assert report.slots == 2 and report.owned == 2

    # Graceful shutdown hands the sessions back so routers re-home them at once.
    owned = dict(replica.ownership.owned)
    assert owned
    await replica.shutdown()
    for sid in owned:
        assert (await store.sessions.get_session(sid)).owner == ""
    assert (await store.replicas.loads([replica.replica_id]))[replica.replica_id] == (0, None)


async def test_a_failing_engine_fails_the_turn_and_the_health_check(make_engine, make_replica, monkeypatch):
    engine = make_engine()
    replica = await make_replica(engine)
    (sid,) = await new_sessions(replica, 1)

    def explode():
        raise RuntimeError("injected engine failure")

    monkeypatch.setattr(engine, "step", explode)
    with pytest.raises(SinkServeError) as failed:
        await turn(replica, sid, "this step fails")
    assert "injected" not in failed.value.message  # internals stay in the server log
    with pytest.raises(RuntimeError, match="engine loop is dead"):
        await replica.check_health()


async def test_parked_sessions_resume_exactly_and_are_reported(make_engine, make_replica):
    """More sessions than slots: idle ones park in host memory and resume with the same cache as if they had
    never left their slot."""
    engine = make_engine(slots=2)
    replica = await make_replica(engine)
    sids = await new_sessions(replica, 5)
    first = {sid: await turn(replica, sid, f"hello from {sid}") for sid in sids}
    assert len(engine.residency.parked()) == 3 and len(engine.residency.resident()) == 2
    assert all([(await replica.info(session_id=s)).parked for s in sids[:3]])
    second = {sid: await turn(replica, sid, "and again") for sid in sids}
    assert engine.residency.stats.unparks >= 3 and replica.turns.rebuilt == 0  # from host memory, not rebuilt

    # The same conversation in an engine with a slot per session (never parked) says the same.
    reference = make_engine(slots=5)
    for sid in sids:
        reference.open_session(sid)
        for text, events in ((f"hello from {sid}", first[sid]), ("and again", second[sid])):
            assert reply(events) == "".join(out.text for out in reference.chat(sid, text, GREEDY))

    report = await replica.stats()
    assert (report.parked, report.sessions, report.rebuilt) == (3, 2, 0)
    assert report.parks >= 6 and report.unparks >= 3
    # Where the turns' time went, summed: ten finished turns, each with a queue, ingest, decode and commit phase.
    assert report.turns == 10 and min(report.queue_s, report.first_token_s, report.decode_s, report.commit_s) > 0
    assert report.forward_s > 0 and report.decode_rows >= 10 * 11 and report.prefill_tokens > 0


async def test_full_slots_queue_then_refuse_with_retry_hint(make_engine, make_replica):
    """Every slot generating: a new turn waits for one; past the admission timeout it is refused with
    RESOURCE_EXHAUSTED and a retry hint, and nothing is recorded for it."""
    engine = make_engine(slots=2)
    replica = await make_replica(engine, admission_timeout_s=0.5)
    sids = await new_sessions(replica, 3)
    busy = [asyncio.create_task(turn(replica, sid, "go on", ENDLESS)) for sid in sids[:2]]
    while not all(engine.has_session(s) and engine.session_view(s).busy for s in sids[:2]):
        await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted) as refused:
        await turn(replica, sids[2], "me too")
    assert refused.value.retry_after_s
    assert await replica.store.sessions.transcript_len(sids[2]) == 0
    # With a longer wait the third turn is admitted as soon as a slot frees up.
    replica.settings.replica.admission_timeout_s = 120
    waiting = asyncio.create_task(turn(replica, sids[2], "me too"))
    await asyncio.sleep(0.2)
    assert not waiting.done() and replica.turns.admission.waiting == 1
    for task in busy:  # the clients go away: their sessions go idle and a slot can be handed over
        task.cancel()
    await asyncio.gather(*busy, return_exceptions=True)
    events = await waiting
    assert events[-1].turn == 1
    assert [await replica.store.sessions.transcript_len(s) for s in sids] == [1, 1, 1]  # the cut turns are recorded
    assert_slots_accounted(engine)


async def test_a_turn_on_the_session_being_parked_waits_and_resumes(make_engine, make_replica):
    """The least recently used idle session gives up its slot; a turn on that very session arriving while the
    engine is parking it must resume it, not start on a cache that just left its slot."""
    engine = make_engine(slots=2)
    replica = await make_replica(engine)
    sids = await new_sessions(replica, 3)
    for sid in sids:
        await turn(replica, sid, f"hello from {sid}")
    parked, victim = sids[0], sids[1]  # two slots: the first session is parked, the second is next
    assert engine.residency.is_parked(parked) and engine.residency.resident()[0] == victim

    release, held = await hold_engine(replica)
    resume_turn = asyncio.create_task(turn(replica, parked, "back again"))
    while replica.loop.pending < 1:
        await asyncio.sleep(0.01)
    victim_turn = asyncio.create_task(turn(replica, victim, "me as well"))
    await asyncio.sleep(0.3)  # the victim's turn gets as far as it can before the engine moves
    release.set()
    await held
    resumed, answered = await asyncio.gather(resume_turn, victim_turn)
    assert resumed[-1].turn == 2 and answered[-1].turn == 2
    assert replica.turns.rebuilt == 0 and engine.residency.stats.unparks >= 2  # came back from host memory
    assert set(engine.sessions.ids()) == set(sids)
    assert_slots_accounted(engine)


@pytest.mark.parametrize("stage", ["queued-for-slot", "loading", "prefill", "decode"])
async def test_a_turn_cancelled_at_any_stage_leaks_no_slot_and_the_session_stays_usable(
    stage, make_engine, make_replica
):
    """The outside probe's defect: a client deadline during a session load once left the engine holding a
    session the replica did not know about ('already exists' on every later turn, a slot lost for good)."""
    engine = make_engine(slots=2, prefill_chunk=4, max_step_tokens=8)
    replica = await make_replica(engine)
    sids = await new_sessions(replica, 3)
    sid = sids[2]
    if stage == "queued-for-slot":
        busy = [asyncio.create_task(turn(replica, s, "go on", ENDLESS)) for s in sids[:2]]
        while not all(engine.has_session(s) and engine.session_view(s).busy for s in sids[:2]):
            await asyncio.sleep(0.01)
        cut = asyncio.create_task(turn(replica, sid, "hello"))
        while replica.turns.admission.waiting < 1:
            await asyncio.sleep(0.01)
        cut.cancel()
        for task in busy:
            task.cancel()
        await asyncio.gather(cut, *busy, return_exceptions=True)
    elif stage == "loading":  # the residency change is queued behind a busy engine thread when the client goes
        release, held = await hold_engine(replica)
        cut = asyncio.create_task(turn(replica, sid, "hello"))
        while replica.loop.pending < 1:
            await asyncio.sleep(0.01)
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)
        release.set()
        await held
    else:
        text = "a long message to ingest " * 40 if stage == "prefill" else "hi"
        cut = asyncio.create_task(turn(replica, sid, text, ENDLESS))
        want = "prefill" if stage == "prefill" else "decode"
        while not (engine.has_session(sid) and engine.sessions.get(sid).state == want):
            await asyncio.sleep(0.001)
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)
    while replica.turns.active:
        await asyncio.sleep(0.01)
    assert_slots_accounted(engine)
    before = await replica.store.sessions.transcript_len(sid)
    events = await turn(replica, sid, "are you still there?")
    assert events[-1].turn == before + 1
    assert await replica.store.sessions.transcript_len(sid) == before + 1
    # The cache and the transcript agree: every id of the session's stream (fed, or queued to be fed with the
    # next message) is in the log, and nothing else.
    record = await replica.store.sessions.get_session(sid)
    _, total = await replica.store.sessions.transcript_ends(sid, engine.sinks, engine.window)
    session = engine.sessions.get(sid)
    assert total == record.tokens_seen == session.tokens_seen + len(session.feed)
    assert_slots_accounted(engine)


async def test_a_deadline_stops_the_turn_and_records_what_the_cache_holds(make_engine, make_replica):
    import time

    from sinkserve.errors import DeadlineExceeded

    engine = make_engine()
    replica = await make_replica(engine)
    (sid,) = await new_sessions(replica, 1)
    with pytest.raises(DeadlineExceeded):
        await turn(replica, sid, "go on", ENDLESS, deadline_unix=time.time() + 0.5)
    assert await replica.store.sessions.transcript_len(sid) == 1
    assert not engine.session_view(sid).busy
    session = engine.sessions.get(sid)
    assert (await replica.store.sessions.get_session(sid)).tokens_seen == session.tokens_seen + len(session.feed)


@pytest.mark.parametrize("state", ["parked", "rebuilt", "new"])
async def test_cancelled_at_any_moment_of_a_load_the_session_stays_whole(state, make_engine, make_replica):
    """A sweep of cancellation moments over the load of a session that must unpark, be rebuilt from its log, or
    be opened by parking a victim: after each, every slot is accounted for and the next turn continues the log."""
    engine = make_engine(slots=2, park_host_bytes=0 if state == "rebuilt" else 2**30)
    replica = await make_replica(engine)
    sids = await new_sessions(replica, 3)
    for sid in sids:
        await turn(replica, sid, "warm up")
    target = sids[0]  # the least recently used: parked (or dropped) when the third session took its slot
    for step in range(12):
        if state == "new":
            target = (await new_sessions(replica, 1))[0]
            await replica.loop.submit(CloseSessionIfIdle(target))  # not resident: its first turn must open it
        cut = asyncio.create_task(turn(replica, target, f"interrupted {step}"))
        await asyncio.sleep(step * 0.002)
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)
        assert_slots_accounted(engine)
        before = await replica.store.sessions.transcript_len(target)
        events = await turn(replica, target, "continue")
        assert events[-1].turn == before + 1
        session = engine.sessions.get(target)
        _, total = await replica.store.sessions.transcript_ends(target, engine.sinks, engine.window)
        assert total == session.tokens_seen + len(session.feed)
        for other in sids:  # move the target out of its slot again for the next moment
            if other != target:
                await turn(replica, other, "meanwhile")


@dataclass(frozen=True)
class CloseSessionIfIdle:
    session_id: str

    def run(self, engine, loop) -> None:
        if engine.has_session(self.session_id) and not engine.session_view(self.session_id).busy:
            engine.close_session(self.session_id)


async def test_a_long_ingest_sends_progress_before_its_text(make_engine, make_replica, monkeypatch):
    """Text that takes longer than the progress period to start arrives after TurnProgress events, so a front
    end's wait for a dead replica never cuts a prefill that is progressing."""
    from sinkserve.protocol import TurnProgress
    from sinkserve.replica import turns as turns_module

    monkeypatch.setattr(turns_module, "PROGRESS_EVERY_S", 0.05)
    engine = make_engine(prefill_chunk=4, max_step_tokens=4)
    replica = await make_replica(engine)
    (sid,) = await new_sessions(replica, 1)
    release, held = await hold_engine(replica)  # the engine is busy elsewhere for a while
    waiting = asyncio.create_task(turn(replica, sid, "a long message " * 30, GenerationParams(max_tokens=3)))
    await asyncio.sleep(0.4)
    release.set()
    await held
    events = await waiting
    kinds = [type(e).__name__ for e in events]
    assert "TurnProgress" in kinds and kinds.index("TurnProgress") < kinds.index("TurnDelta")
    assert isinstance(events[-1], TurnFinished) and all(e.waited_s >= 0 for e in events if isinstance(e, TurnProgress))


async def test_an_overloaded_replica_refuses_a_turn_it_cannot_start_before_its_deadline(make_engine, make_replica):
    """Issue 11 item 12: with a long ingest queued ahead, a turn whose deadline comes first is refused at once
    (RESOURCE_EXHAUSTED with a retry hint, nothing recorded) instead of failing at its deadline."""
    import time

    engine = make_engine(prefill_chunk=8, max_step_tokens=8)
    replica = await make_replica(engine)
    busy_sid, sid = await new_sessions(replica, 2)
    backlog = asyncio.create_task(turn(replica, busy_sid, "lorem ipsum " * 20_000, GenerationParams(max_tokens=1)))
    while (await replica.loop.submit(Snapshot())).prefill_tokens_per_s is None:  # the engine has measured its rate
        await asyncio.sleep(0.01)
    # Refused up front (RESOURCE_EXHAUSTED "overloaded"), not failed at its deadline (DEADLINE_EXCEEDED).
    with pytest.raises(ResourceExhausted, match="overloaded") as refused:
        await turn(replica, sid, "hello?", deadline_unix=time.time() + 0.5)
    assert refused.value.retry_after_s >= 1
    assert await replica.store.sessions.transcript_len(sid) == 0
    # Without a deadline that tight the same turn is accepted (it waits its turn).
    backlog.cancel()
    await asyncio.gather(backlog, return_exceptions=True)
    events = await turn(replica, sid, "hello?", deadline_unix=time.time() + 60)
    assert events[-1].turn == 1


async def test_a_session_parked_again_before_its_turn_starts_is_loaded_again(make_engine, make_replica):
    """Two loads undo each other (each parks the other's idle session) before either turn starts: both turns still
    run (the later waits for a slot) instead of one failing RESOURCE_EXHAUSTED: the short load test's failure."""
    engine = make_engine(slots=2)
    replica = await make_replica(engine)
    generating, idle, target = await new_sessions(replica, 3)
    for sid in (target, idle):
        await turn(replica, sid, "warm up")
    busy = asyncio.create_task(turn(replica, generating, "go on", ENDLESS))  # parks the target, least recent
    while not (engine.has_session(generating) and engine.session_view(generating).busy):
        await asyncio.sleep(0.01)
    assert engine.residency.is_parked(target) and engine.residency.is_resident(idle)
    release, held = await hold_engine(replica)
    turns = [asyncio.create_task(turn(replica, sid, "now")) for sid in (target, idle)]
    while replica.loop.pending < 2:
        await asyncio.sleep(0.01)
    release.set()
    await held
    await asyncio.sleep(0.5)
    busy.cancel()  # a slot frees up for the turn that had to wait
    await asyncio.gather(busy, return_exceptions=True)
    results = await asyncio.gather(*turns)
    assert [r[-1].turn for r in results] == [2, 2]
    assert_slots_accounted(engine)
