"""The continuous-batching loop: one thread owns the engine and runs every forward step.

The engine is not thread-safe, so nothing else touches it. Callers submit typed commands (below) that run on the
engine thread between two steps, in the order submitted, and await their results; a turn's TokenOutputs reach
the asyncio queue its `StartTurn` named. Between steps the loop first runs the queued commands (so a new turn
joins the very next batched step), then one `engine.step()` if any session has work, and blocks on the command
queue when idle.

Each command is one atomic change of the engine's state. A caller cancelled while awaiting one leaves nothing
half-done: the command either runs whole or not at all, and residency is recorded only in the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sinkserve.engine import Engine, TokenOutput
from sinkserve.engine.output import StepStats
from sinkserve.errors import ReplicaUnavailable, SessionNotFound, ShardLost
from sinkserve.protocol import GenerationParams, SessionView

logger = logging.getLogger("sinkserve.replica")


@dataclass(frozen=True)
class TurnSink:
    """Where a turn's TokenOutputs go: an asyncio queue on the replica's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


# ---------------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Acquire:
    """Make the session resident under `epoch`: True, or False when it must be rebuilt (see Engine.acquire)."""

    session_id: str
    epoch: int

    def run(self, engine: Engine, loop: "EngineLoop") -> bool:
        return engine.acquire(self.session_id, self.epoch)


@dataclass(frozen=True)
class Rebuild:
    """Give the session a cache under `epoch` from its transcript's two ends (or, with no transcript yet, open it
    with its system prompt). Idempotent: a session already held under `epoch` is only made resident."""

    session_id: str
    epoch: int
    transcript: list[int]
    total_tokens: int
    system_prompt: str | None

    def run(self, engine: Engine, loop: "EngineLoop") -> bool:
        """True when a cache was rebuilt from the transcript."""
        if engine.acquire(self.session_id, self.epoch):
            return False
        if self.transcript:
            engine.import_session(self.session_id, self.transcript, self.total_tokens, tag=self.epoch)
            return True
        engine.open_session(self.session_id, self.system_prompt, tag=self.epoch)
        return False


class NotLoaded(SessionNotFound):
    """The session is not in this engine (under that epoch): load it first."""


@dataclass(frozen=True)
class StartTurn:
    session_id: str
    epoch: int
    text: str
    params: GenerationParams
    sink: TurnSink

    def run(self, engine: Engine, loop: "EngineLoop") -> None:
        if not engine.has_session(self.session_id, self.epoch):
            raise NotLoaded(f"session {self.session_id} is not loaded on this replica")
        engine.add_message(self.session_id, self.text, self.params)
        loop.subscribers[self.session_id] = self.sink


@dataclass(frozen=True)
class AbortTurn:
    """Stop the session's turn now; returns its final TokenOutput (None when no turn was running)."""

    session_id: str

    def run(self, engine: Engine, loop: "EngineLoop") -> TokenOutput | None:
        loop.subscribers.pop(self.session_id, None)
        if not engine.has_session(self.session_id):
            return None
        return engine.abort_turn(self.session_id)


@dataclass(frozen=True)
class CloseSession:
    """Take the session out of the engine (aborting a running turn, whose stream then ends with `reason`)."""

    session_id: str
    reason: BaseException | None = None

    def run(self, engine: Engine, loop: "EngineLoop") -> bool:
        sink = loop.subscribers.pop(self.session_id, None)
        if sink is not None and self.reason is not None:
            sink.put(self.reason)
        if not engine.has_session(self.session_id):
            return False
        engine.close_session(self.session_id)
        return True


@dataclass(frozen=True)
class ViewSession:
    session_id: str

    def run(self, engine: Engine, loop: "EngineLoop") -> SessionView | None:
        return engine.session_view(self.session_id) if engine.has_session(self.session_id) else None


@dataclass(frozen=True)
class EngineSnapshot:
    slots: int
    free_slots: int
    resident: int
    parked: int
    busy: int
    parks: int
    unparks: int
    drops: int
    steps: int
    pending_prompt_tokens: int  # message ids waiting to be ingested
    step_s: float | None  # moving average of a step's wall time (None before the first step)
    prefill_tokens_per_s: float | None  # moving average of the ingest rate of steps that ingested
    totals: "LoopTotals"  # a copy
    tokens_per_s: float | None = None  # moving average of all tokens a step processes (decode rows + prefill) per s
    step_cost: tuple[float, float] | None = None  # a step's (fixed s, s per token), fitted by the scheduler


@dataclass(frozen=True)
class Snapshot:
    def run(self, engine: Engine, loop: "EngineLoop") -> EngineSnapshot:
        residency = engine.residency
        return EngineSnapshot(
            slots=engine.slots, free_slots=engine.free_slots, resident=len(residency.resident()),
            parked=len(residency.parked()), busy=sum(s.busy for s in engine.sessions.all()),
            parks=residency.stats.parks, unparks=residency.stats.unparks, drops=residency.stats.drops,
            steps=loop.steps, pending_prompt_tokens=engine.pending_prompt_tokens(), step_s=loop.timing.step_s,
            prefill_tokens_per_s=loop.timing.prefill_tokens_per_s, totals=dataclasses.replace(loop.totals),
            tokens_per_s=loop.timing.tokens_per_s,
            step_cost=engine.scheduler.cost.line() if engine.scheduler.cost.measured else None,
        )


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class LoopTotals:
    """Where the engine thread's time went since the loop started (seconds), and what its steps held. The parts
    add up to the thread's wall time, less the loop's own bookkeeping."""

    steps: int = 0
    decode_rows: int = 0
    prefill_tokens: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0
    output_s: float = 0.0  # session bookkeeping, detokenising, stop strings
    step_other_s: float = 0.0  # the rest of a step: planning, step inputs
    deliver_s: float = 0.0  # handing each step's outputs to the turns' queues
    commands: int = 0
    commands_s: float = 0.0  # residency moves (park, unpark, rebuild), turn starts and aborts, views
    idle_s: float = 0.0  # waiting for a command with no work

    def add_step(self, step: StepStats, step_s: float, deliver_s: float) -> None:
        self.steps += 1
        self.decode_rows += step.decode_rows
        self.prefill_tokens += step.prefill_tokens
        self.forward_s += step.forward_s
        self.sample_s += step.sample_s
        self.output_s += step.output_s
        self.step_other_s += max(0.0, step_s - step.forward_s - step.sample_s - step.output_s)
        self.deliver_s += deliver_s


@dataclass
class StepTiming:
    """Moving averages over the engine's recent steps: what admission estimates a new turn's wait from."""

    weight: float = 0.2  # of the newest step
    step_s: float | None = None
    prefill_tokens_per_s: float | None = None
    tokens_per_s: float | None = None  # the engine's throughput in the token mix it is serving now

    def observe(self, seconds: float, prefill_tokens: int, decode_rows: int = 0) -> None:
        self.step_s = self._mix(self.step_s, seconds)
        if prefill_tokens and seconds > 0:
            self.prefill_tokens_per_s = self._mix(self.prefill_tokens_per_s, prefill_tokens / seconds)
        if seconds > 0 and prefill_tokens + decode_rows:
            self.tokens_per_s = self._mix(self.tokens_per_s, (prefill_tokens + decode_rows) / seconds)

    def _mix(self, average: float | None, value: float) -> float:
        return value if average is None else (1 - self.weight) * average + self.weight * value


@dataclass
class _Pending:
    command: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


_STOP = object()


class EngineLoop:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.5):
        self.engine = engine
        self._commands: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.subscribers: dict[str, TurnSink] = {}  # engine thread only
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="sinkserve-engine-loop", daemon=True)
        self.error: BaseException | None = None
        self.steps = 0
        self.timing = StepTiming()
        self.totals = LoopTotals()
        self.started = time.perf_counter()  # when the engine thread began (reset by it)
        self.last_beat = time.monotonic()

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        self._commands.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def pending(self) -> int:
        return self._commands.qsize()

    def submit(self, command: Any) -> "asyncio.Future[Any]":
        """Queue `command` for the engine thread; await the returned future for its result."""
        if not self.alive:
            raise ReplicaUnavailable("the replica's engine is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._commands.put(_Pending(command, loop, future))
        return future

    # ---- engine thread
    def _run(self) -> None:
        self.started = time.perf_counter()
        try:
            while True:
                if not self._run_commands(block=not self.engine.has_work()):
                    return
                if self.engine.has_work():
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    stepped = time.perf_counter()
                    for out in outputs:
                        self._deliver(out)
                    self.steps += 1
                    step = self.engine.last_step
                    if step is not None:
                        self.timing.observe(stepped - started, step.prefill_tokens, step.decode_rows)
                        self.totals.add_step(step, stepped - started, time.perf_counter() - stepped)
                self.last_beat = time.monotonic()
        except BaseException as err:  # noqa: BLE001 - a dead loop must fail every waiter, whatever killed it
            logger.exception("engine loop died")
            self.error = err
            # A lost shard is named to the client (the transport's details stay in this log); anything else
            # stays internal.
            why = ": a tensor-parallel shard was lost" if isinstance(err, ShardLost) else ""
            for sink in self.subscribers.values():
                sink.put(ReplicaUnavailable(f"the replica's engine failed{why}"))
            self.subscribers.clear()
            self._fail_pending()

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands; False when asked to stop."""
        waited = time.perf_counter()
        try:
            item = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            self.totals.idle_s += time.perf_counter() - waited if block else 0.0
            return True
        started = time.perf_counter()
        if block:
            self.totals.idle_s += started - waited
        try:
            return self._run_queued(item)
        finally:
            self.totals.commands_s += time.perf_counter() - started

    def _run_queued(self, item: Any) -> bool:
        while True:
            if item is _STOP:
                self._fail_pending()
                return False
            self.totals.commands += 1
            try:
                result = item.command.run(self.engine, self)
            except Exception as err:  # noqa: BLE001 - the caller gets the error
                item.loop.call_soon_threadsafe(_settle, item.future, None, err)
            else:
                item.loop.call_soon_threadsafe(_settle, item.future, result, None)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _deliver(self, out: TokenOutput) -> None:
        sink = self.subscribers.get(out.session_id)
        if sink is None:
            return
        if out.finished:
            del self.subscribers[out.session_id]
        sink.put(out)

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.loop.call_soon_threadsafe(_settle, item.future, None,
                                               ReplicaUnavailable("the replica's engine stopped"))


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting; the command ran (or failed) all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
