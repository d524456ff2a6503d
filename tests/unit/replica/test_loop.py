"""The engine loop on its own: typed commands in order between steps, errors to their caller, a dead loop."""

from __future__ import annotations

import asyncio

import pytest

from sinkserve.errors import InvalidArgument, ReplicaUnavailable, SessionNotFound
from sinkserve.protocol import GenerationParams
from sinkserve.replica.loop import (
    AbortTurn,
    Acquire,
    CloseSession,
    EngineLoop,
    Rebuild,
    Snapshot,
    StartTurn,
    TurnSink,
    ViewSession,
)


@pytest.fixture
def loop(make_engine):
    engine_loop = EngineLoop(make_engine(slots=2)).start()
    yield engine_loop
    engine_loop.stop()


def sink() -> TurnSink:
    return TurnSink(asyncio.get_running_loop(), asyncio.Queue())


async def finish(turn_sink: TurnSink) -> list:
    events = []
    while not events or not getattr(events[-1], "finished", False):
        events.append(await asyncio.wait_for(turn_sink.queue.get(), 30))
    return events


async def test_commands_run_in_order_and_a_turn_streams_to_its_sink(loop):
    assert await loop.submit(Acquire("s", epoch=1)) is False  # unknown: to be rebuilt
    assert await loop.submit(Rebuild("s", 1, [], 0, "Be brief.")) is False  # opened, not rebuilt from a log
    assert await loop.submit(Acquire("s", epoch=1)) is True
    out = sink()
    # Submitted back to back: the turn starts before the view is taken, in the order given.
    started = loop.submit(StartTurn("s", 1, "hello", GenerationParams(max_tokens=5, ignore_eos=True), out))
    view = loop.submit(ViewSession("s"))
    await started
    assert (await view).busy
    events = await finish(out)
    assert len(events) == 5 and events[-1].finish_reason == "length" and events[-1].turn_tokens
    snapshot = await loop.submit(Snapshot())
    assert (snapshot.slots, snapshot.resident, snapshot.busy) == (2, 1, 0) and snapshot.steps >= 5


async def test_a_rebuild_is_idempotent_and_a_stale_epoch_is_replaced(loop):
    ids = list(range(100, 140))
    assert await loop.submit(Rebuild("s", 1, ids, len(ids), None)) is True
    assert await loop.submit(Rebuild("s", 1, ids, len(ids), None)) is False  # already held under epoch 1
    assert (await loop.submit(ViewSession("s"))).resident
    assert await loop.submit(Acquire("s", epoch=2)) is False  # another owner served it since: dropped here
    assert await loop.submit(ViewSession("s")) is None
    assert (await loop.submit(Snapshot())).free_slots == 2


async def test_a_failing_command_fails_only_its_caller(loop):
    with pytest.raises(SessionNotFound):
        await loop.submit(StartTurn("nobody", 0, "hi", GenerationParams(), sink()))
    await loop.submit(Rebuild("s", 0, [], 0, None))
    with pytest.raises(InvalidArgument, match="empty"):
        await loop.submit(StartTurn("s", 0, "   ", GenerationParams(), sink()))
    assert await loop.submit(AbortTurn("s")) is None  # nothing was started
    assert loop.alive and not (await loop.submit(ViewSession("s"))).busy


async def test_closing_a_session_mid_turn_ends_its_stream_with_the_reason(loop):
    await loop.submit(Rebuild("s", 0, [], 0, None))
    out = sink()
    await loop.submit(StartTurn("s", 0, "go", GenerationParams(max_tokens=1_000_000, ignore_eos=True), out))
    reason = SessionNotFound("session s was deleted")
    assert await loop.submit(CloseSession("s", reason)) is True
    while (item := await asyncio.wait_for(out.queue.get(), 30)) is not reason:
        assert not item.finished
    assert await loop.submit(CloseSession("s")) is False


async def test_a_dead_loop_fails_running_turns_and_every_later_command(make_engine, monkeypatch):
    engine = make_engine()
    loop = EngineLoop(engine).start()
    await loop.submit(Rebuild("s", 0, [], 0, None))

    def explode():
        raise RuntimeError("injected")

    monkeypatch.setattr(engine, "step", explode)
    out = sink()
    await loop.submit(StartTurn("s", 0, "go", GenerationParams(), out))
    assert isinstance(await asyncio.wait_for(out.queue.get(), 30), ReplicaUnavailable)
    assert not loop.alive and isinstance(loop.error, RuntimeError)
    with pytest.raises(ReplicaUnavailable):
        loop.submit(Snapshot())


async def test_step_metrics_add_up_to_the_engine_threads_time(loop):
    """Where the engine thread's time went: the parts (forward, sampling, output, the rest of each step, handing
    tokens on, commands, idle) add up to its wall time within 5% (the loop's own bookkeeping is the rest)."""
    import time

    for i in range(2):
        await loop.submit(Rebuild(f"s{i}", 0, [], 0, None))
    sinks = [sink() for _ in range(2)]
    for i, out in enumerate(sinks):
        await loop.submit(StartTurn(f"s{i}", 0, "count to ten " * (i + 1), GenerationParams(max_tokens=20,
                                                                                          ignore_eos=True), out))
    for out in sinks:
        await finish(out)
    await asyncio.sleep(0.6)  # some idle time too
    snapshot = await loop.submit(Snapshot())
    wall = time.perf_counter() - loop.started
    totals = snapshot.totals
    parts = (totals.forward_s + totals.sample_s + totals.output_s + totals.step_other_s + totals.deliver_s
             + totals.commands_s + totals.idle_s)
    assert 0.95 * wall <= parts <= wall
    assert totals.steps == snapshot.steps >= 20 and totals.decode_rows >= 2 * 19
    assert totals.prefill_tokens > 0 and totals.commands >= 5 and totals.idle_s > 0.3
    assert snapshot.step_s > 0 and snapshot.prefill_tokens_per_s > 0
