"""One turn on this replica: admission, residency, streaming, and the transcript commit.

A turn is acknowledged (its `TurnFinished` sent) only after its tokens are in the transcript. Whatever cuts a
turn short (client hang-up, deadline, a failure), the part of the reply the cache holds is recorded, so the
transcript and the cache never disagree; if that cannot be done the cache is dropped, to be rebuilt from the
log. Commits are shielded from cancellation: once started they finish. A commit records the turn's result too
(request id, reply text, finish reason, usage: ``TurnRecord``), so a client retrying with its request id gets it.

A turn started with the gateway's ``turn_id`` watches the session's turn lock, a lease that gateway renews while
it streams: once the lock lapsed (the gateway died; Ray does not cancel a turn whose caller process died) or went
to another turn, the turn stops and is recorded as cut (aborted) within LOCK_CHECK_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from redis import exceptions as redis_exc

from sinkserve.config import ReplicaConfig
from sinkserve.engine import TokenOutput
from sinkserve.errors import (
    Aborted,
    DeadlineExceeded,
    Fenced,
    NoFreeSlot,
    ReplicaUnavailable,
    ResourceExhausted,
    SessionBusy,
    SessionNotFound,
    SinkServeError,
    StoreUnavailable,
)
from sinkserve.protocol import GenerationParams, TurnDelta, TurnEvent, TurnFinished, TurnProgress
from sinkserve.replica.loop import (
    AbortTurn,
    NotLoaded,
    Acquire,
    CloseSession,
    EngineLoop,
    EngineSnapshot,
    Rebuild,
    Snapshot,
    StartTurn,
    TurnSink,
    ViewSession,
)
from sinkserve.replica.metrics import ReplicaMetrics
from sinkserve.store import SessionRecord, Store, TurnRecord
from sinkserve.store.sessions import message_digest

logger = logging.getLogger("sinkserve.replica")

STORE_ERRORS = (redis_exc.RedisError, ConnectionError, OSError)
PROGRESS_EVERY_S = 2.0  # a turn with no text yet says it is alive this often (TurnProgress)
START_ATTEMPTS = 20  # loads of one turn's session that others may undo before it starts
ENGINE_STALL_S = 60.0  # an engine thread that has not come round for this long is stuck
LOCK_CHECK_S = 1.0  # how often a turn checks that its gateway still holds the session's turn lock
BYTES_PER_TOKEN = 3  # a message's token count before it is tokenised (on the engine thread), for estimates
# A turn is accepted only if its estimated finish leaves this share of its deadline budget unused: every turn
# accepted makes the steps of all the others slower, so one accepted right at its budget would end past it.
ACCEPT_SHARE = 0.8
EXPECTED_TOKENS_BEFORE_HISTORY = 16  # new tokens expected of a turn before any turn here has finished


def first_token_estimate_s(snapshot: EngineSnapshot, message_bytes: int) -> float:
    """How long a new turn would wait for its first token: everything queued for ingestion ahead of it, and its
    own message, at the recent ingest rate, plus one step. 0 before the engine has measured anything."""
    if not snapshot.prefill_tokens_per_s:
        return 0.0
    tokens = snapshot.pending_prompt_tokens + message_bytes / BYTES_PER_TOKEN
    # The step a turn joins is one now running; an idle engine's step-time average is stale.
    return tokens / snapshot.prefill_tokens_per_s + ((snapshot.step_s or 0.0) if snapshot.busy else 0.0)


def turn_estimate_s(snapshot: EngineSnapshot, message_bytes: int, new_tokens: float, waiting: int = 0) -> float:
    """How long a new turn would take to finish, from what the engine measures now. Two bounds, the larger wins:
    - the work ahead of its last token (every prompt token queued for ingestion, its own message, the rest of the
      running turns' replies, taken as half done, the waiting turns' replies and its own) at the engine's recent
      throughput in tokens of that mix per second;
    - its own path: a wait for a slot while every slot is generating (`waiting` turns accepted here are ahead of
      it; slots free as turns end), its message ingested, then one token per step, a step holding every turn
      that will share it (the step cost line scales the measured step time to that batch).
    Every running turn shares the steps, so under overload both grow: they catch the collapse where every turn
    starts but none finishes before its deadline, without refusing work an idle engine could do. An engine with
    nothing running estimates from its ingest queue only (stale averages must not refuse work forever)."""
    if not snapshot.busy or not snapshot.tokens_per_s:
        return first_token_estimate_s(snapshot, message_bytes)
    first = first_token_estimate_s(snapshot, message_bytes)
    work = (snapshot.pending_prompt_tokens + message_bytes / BYTES_PER_TOKEN
            + (snapshot.busy / 2 + waiting + 1) * new_tokens)
    by_throughput = work / snapshot.tokens_per_s + (snapshot.step_s or 0.0)
    step = snapshot.step_s or 0.0
    sharing = min(snapshot.slots, snapshot.busy + waiting + 1)  # rows of the steps this turn's tokens come in
    if snapshot.step_cost is not None:
        fixed, per_token = snapshot.step_cost
        step *= (fixed + per_token * sharing) / (fixed + per_token * snapshot.busy)
    own = first + new_tokens * step
    ahead = snapshot.busy + waiting + 1 - snapshot.slots  # turns that must end before a slot is this turn's
    slot_wait = max(0, ahead) * own / snapshot.slots
    return max(by_throughput, slot_wait + own)


@dataclass
class Calibration:
    """How long accepted turns took against what was estimated when they were accepted: the next estimate is
    scaled by the moving average of that ratio, so what the estimate leaves out (parking churn, the gateway, the
    commit) is measured rather than guessed. Only estimates of a second or more teach it: below that the ratio
    is noise. A turn cut off (deadline, hang-up) teaches it only that it took at least as long as it ran."""

    weight: float = 0.1
    ratio: float = 1.0
    # The estimate's bounds are pessimistic under parking churn: at 100 chats the accepted turns took a quarter of
    # what was estimated, and a 0.5 floor refused three turns in four that would have finished (docs/loadtest.md).
    low: float = 0.1
    high: float = 4.0
    min_estimate_s: float = 1.0

    def observe(self, estimated_s: float, actual_s: float, cut_off: bool = False) -> None:
        if estimated_s < self.min_estimate_s or (cut_off and actual_s <= estimated_s * self.ratio):
            return
        value = min(self.high, max(self.low, actual_s / estimated_s))
        self.ratio = (1 - self.weight) * self.ratio + self.weight * value


@dataclass
class TurnTotals:
    """Where this replica's turns spent their time since it started (seconds, summed over turns)."""

    turns: int = 0
    queue_s: float = 0.0  # from arrival until the cache is in a slot (admission wait, park/unpark/rebuild)
    first_token_s: float = 0.0  # from then until the first text (ingesting the message)
    decode_s: float = 0.0  # from the first text until the last token
    completion_tokens: int = 0  # new tokens of the turns that finished
    commit_s: float = 0.0  # appending the turn to the transcript in Redis
    rebuild_read_s: float = 0.0  # reading transcript ends for rebuilds

    def add(self, phases: dict[str, float], completion_tokens: int = 0) -> None:
        self.turns += 1
        self.completion_tokens += completion_tokens
        for name, seconds in phases.items():
            setattr(self, name, getattr(self, name) + seconds)

    def expected_tokens(self, max_tokens: int) -> float:
        """New tokens a turn capped at `max_tokens` is expected to generate: the mean so far, capped."""
        mean = self.completion_tokens / self.turns if self.turns else EXPECTED_TOKENS_BEFORE_HISTORY
        return min(float(max_tokens), mean)


class Admission:
    """Turns waiting for a KV slot while every slot is generating: a bounded queue with a bounded wait."""

    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.waiting = 0
        self._released = asyncio.Condition()

    async def released(self) -> None:
        """A slot may be free or parkable now (a turn ended, a session closed)."""
        async with self._released:
            self._released.notify_all()

    def give_up_at(self, deadline_unix: float | None) -> float:
        give_up = time.monotonic() + self.cfg.admission_timeout_s
        if deadline_unix is not None:
            give_up = min(give_up, time.monotonic() + max(0.0, deadline_unix - time.time()))
        return give_up

    async def wait(self, give_up: float) -> None:
        """Wait for a release (at most a second, then the caller retries); refuse past `give_up`."""
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            raise ResourceExhausted(
                f"every cache slot on this replica is generating (waited {self.cfg.admission_timeout_s:.0f}s at "
                "most); retry shortly",
                retry_after_s=1.0,
            )
        async with self._released:
            try:
                await asyncio.wait_for(self._released.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass

    def enter(self) -> None:
        if self.waiting >= self.cfg.admission_queue:
            raise ResourceExhausted("every cache slot is generating and the wait queue is full", retry_after_s=1.0)
        self.waiting += 1

    def leave(self) -> None:
        self.waiting -= 1


class Turns:
    def __init__(self, loop: EngineLoop, store: Store, replica_id: str, cfg: ReplicaConfig, metrics: ReplicaMetrics,
                 cache_ends: tuple[int, int], on_lost: Callable[[str], Awaitable[None]]):
        self.loop = loop
        self.store = store
        self.replica_id = replica_id
        self.admission = Admission(cfg)
        self.metrics = metrics
        self.sinks, self.window = cache_ends  # what a rebuild reads from the transcript's two ends
        self.on_lost = on_lost  # the session must not be served from this replica's cache again
        self.active: set[str] = set()
        self.rebuilt = 0
        self.totals = TurnTotals()
        self.calibration = Calibration()

    # ---- residency
    async def make_resident(self, record: SessionRecord, epoch: int, deadline_unix: float | None = None) -> None:
        """The session's cache in a slot under `epoch`: kept, copied back from host memory, or rebuilt from the
        transcript's ends. Waits (bounded) while every slot is generating."""
        sid = record.session_id
        queued, give_up = False, None
        try:
            while True:
                try:
                    if await self.loop.submit(Acquire(sid, epoch)):
                        return
                    read_started = time.perf_counter()
                    ids, total = await self.store.sessions.transcript_ends(sid, self.sinks, self.window)
                    self.totals.rebuild_read_s += time.perf_counter() - read_started
                    if await self.loop.submit(Rebuild(sid, epoch, ids, total, record.system_prompt or None)):
                        self.rebuilt += 1
                        self.metrics.count("rebuilds")
                    return
                except NoFreeSlot:
                    if not queued:
                        self.admission.enter()
                        queued, give_up = True, self.admission.give_up_at(deadline_unix)
                    await self.admission.wait(give_up)
        finally:
            if queued:
                self.admission.leave()

    async def refuse_if_late(self, message_bytes: int, deadline_unix: float, max_tokens: int) -> float:
        """Overload: a turn that could not finish before its deadline (it waits for a slot, its first token
        waits behind the ingest queue, then its tokens come one step each) is refused now, with a retry hint,
        instead of taking engine time and failing at its deadline: the turns accepted finish, and goodput stays at
        capacity. Returns the raw estimate, which the turn's real duration calibrates."""
        snapshot = await self.loop.submit(Snapshot())
        waiting = max(0, len(self.active) - 1 - snapshot.busy)  # accepted here, not yet generating
        raw = turn_estimate_s(snapshot, message_bytes, self.totals.expected_tokens(max_tokens), waiting)
        estimate = raw * self.calibration.ratio
        budget = deadline_unix - time.time()
        if estimate > ACCEPT_SHARE * budget:
            self.metrics.count("refused_early")
            raise ResourceExhausted(
                f"this replica is overloaded: the turn would take about {estimate:.0f}s, past its deadline; "
                "retry shortly",
                retry_after_s=min(30.0, max(1.0, estimate - ACCEPT_SHARE * budget)),
            )
        return raw

    # ---- a turn
    async def run(self, record: SessionRecord, epoch: int, text: str, params: GenerationParams,
                  deadline_unix: float | None, turn_id: str | None = None,
                  request_id: str | None = None) -> AsyncIterator[TurnEvent]:
        sid = record.session_id
        if sid in self.active:
            raise SessionBusy(f"session {sid} is still replying to a previous message")
        self.active.add(sid)
        try:
            estimate = None
            if deadline_unix is not None:
                estimate = await self.refuse_if_late(len(text.encode()), deadline_unix, params.max_tokens)
            arrived = time.perf_counter()
            sink = TurnSink(asyncio.get_running_loop(), asyncio.Queue())
            started: asyncio.Future | None = None
            finished = False
            reply: list[str] = []  # the reply text so far: recorded with the turn
            watching = asyncio.Event()
            watch = asyncio.create_task(self._watch_lock(sid, turn_id, sink, watching)) if turn_id else None
            try:
                for _ in range(START_ATTEMPTS):
                    await self.make_resident(record, epoch, deadline_unix)
                    # Another turn's load may park (or drop) this idle session before its own turn starts: then
                    # it is loaded again, waiting for a slot if need be.
                    started = self.loop.submit(StartTurn(sid, epoch, text, params, sink))
                    try:
                        await asyncio.shield(started)
                        break
                    except (NoFreeSlot, NotLoaded):
                        continue
                else:
                    raise ResourceExhausted("the replica's cache slots are too contended; retry shortly",
                                            retry_after_s=1.0)
                phases = {"queue_s": time.perf_counter() - arrived}
                resident = first_text = time.perf_counter()
                async for event in self._stream(sink, deadline_unix):
                    if isinstance(event, TurnDelta) and "first_token_s" not in phases:
                        first_text = time.perf_counter()
                        phases["first_token_s"] = first_text - resident
                    if isinstance(event, TokenOutput):
                        finished = True
                        ended = time.perf_counter()
                        phases.setdefault("first_token_s", ended - resident)
                        phases["decode_s"] = ended - max(first_text, resident)
                        turns = await asyncio.shield(self._commit(
                            record, epoch, event, self._turn_record(event, reply, text, request_id, turn_id)))
                        phases["commit_s"] = time.perf_counter() - ended
                        if estimate is not None:
                            self.calibration.observe(estimate, time.perf_counter() - arrived)
                        self.totals.add(phases, event.completion_tokens)
                        self.metrics.observe_turn(phases)
                        yield TurnFinished(
                            finish_reason=event.finish_reason or "eos", prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens, turn=turns, replica=self.replica_id,
                            cache_entries=await self._cache_entries(sid), text=event.text or "",
                        )
                        return
                    if isinstance(event, TurnDelta):
                        reply.append(event.text)
                    yield event
            except BaseException:
                if estimate is not None and not finished:
                    self.calibration.observe(estimate, time.perf_counter() - arrived, cut_off=True)
                if not finished:
                    # Cancelled (client hang-up, deadline, the lock lapsed) or failed: stop generating now and record
                    # the part of the reply the cache holds, so the transcript and the cache stay the same.
                    await asyncio.shield(self._abort_and_record(record, epoch, sink, started, reply, text, request_id,
                                                                turn_id))
                raise
            finally:
                if watch is not None:  # the event too: a cancellation can be lost in a Redis call (gh-86296)
                    watching.set()
                    watch.cancel()
        finally:
            self.active.discard(sid)
            await self.admission.released()

    async def _stream(self, sink: TurnSink, deadline_unix: float | None) -> AsyncIterator[TurnEvent | TokenOutput]:
        """The turn's text, one TurnDelta per batch of queued steps, then its final TokenOutput. While no text comes
        (a long message being ingested) a TurnProgress every few seconds, as long as the engine thread is alive."""
        started = time.monotonic()
        while True:
            timeout = PROGRESS_EVERY_S
            if deadline_unix is not None:
                timeout = min(timeout, max(0.0, deadline_unix - time.time()))
            try:
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                    item = await sink.queue.get()
            except TimeoutError:
                if deadline_unix is not None and time.time() >= deadline_unix:
                    raise DeadlineExceeded("the turn ran past its deadline and was stopped") from None
                if time.monotonic() - self.loop.last_beat > ENGINE_STALL_S:
                    raise ReplicaUnavailable("the replica's engine stopped making progress") from None
                yield TurnProgress(round(time.monotonic() - started, 1))
                continue
            items = [item]
            while not sink.queue.empty():  # steps that ran while we waited go out as one delta
                items.append(sink.queue.get_nowait())
            text, tokens = "", 0
            for item in items:
                if isinstance(item, BaseException):
                    if text:  # generated before the stop: part of the recorded reply
                        yield TurnDelta(text, tokens)
                    raise item
                if item.finished:
                    if text:
                        yield TurnDelta(text, tokens)
                    yield item
                    return
                text, tokens = text + item.text, tokens + 1
            if text:
                yield TurnDelta(text, tokens)

    async def _watch_lock(self, sid: str, turn_id: str, sink: TurnSink, stopped: asyncio.Event) -> None:
        """Stop the turn once its gateway no longer holds the session's turn lock (see the module docstring)."""
        while not stopped.is_set():
            try:
                async with asyncio.timeout(LOCK_CHECK_S):
                    await stopped.wait()
                return
            except TimeoutError:
                pass
            try:
                holder = await self.store.sessions.turn_holder(sid)
            except STORE_ERRORS:
                continue  # the store's trouble, not the gateway's: the commit will tell
            if holder != turn_id and not stopped.is_set():
                logger.info("turn %s of %s stopped: its session lock lapsed (its gateway is gone)", turn_id, sid)
                sink.queue.put_nowait(Aborted("the turn was stopped: its gateway stopped holding the session"))
                return

    def _turn_record(self, final: TokenOutput, reply: list[str], message: str, request_id: str | None,
                     turn_id: str | None) -> TurnRecord:
        return TurnRecord(request_id or "", "".join(reply) + (final.text or ""), final.finish_reason or "eos",
                          final.prompt_tokens, final.completion_tokens, self.replica_id, message_digest(message),
                          turn_id or "")

    async def _abort_and_record(self, record: SessionRecord, epoch: int, sink: TurnSink,
                                started: asyncio.Future | None, reply: list[str] | None = None, message: str = "",
                                request_id: str | None = None, turn_id: str | None = None) -> None:
        sid = record.session_id
        reply = [] if reply is None else reply
        try:
            final = await self.loop.submit(AbortTurn(sid))
        except ReplicaUnavailable:
            return  # the engine is gone, and its caches with it
        while not sink.queue.empty():  # text produced before the abort; or the turn ended on its own just before
            item = sink.queue.get_nowait()
            if isinstance(item, TokenOutput):
                if item.finished:
                    final = final or item
                else:
                    reply.append(item.text)
        if final is None:
            if started is not None and started.done() and not started.cancelled() and started.exception() is None:
                await self.drop(sid)  # a turn ran but left no record: rebuild from the log to be safe
            return  # the turn never started: the cache is as the transcript says
        try:
            await self._commit(record, epoch, final, self._turn_record(final, reply, message, request_id, turn_id))
        except SinkServeError:  # _commit already dropped the cache
            logger.warning("could not record the aborted turn of %s", sid, exc_info=True)

    async def _commit(self, record: SessionRecord, epoch: int, final: TokenOutput,
                      turn: TurnRecord | None = None) -> int:
        """Append the turn's tokens to the transcript (and charge the tenant, and record `turn`, its result);
        returns the session's turn count. If that fails the cache is dropped, to be rebuilt from the log."""
        sid = record.session_id
        try:
            return await self.store.sessions.append_transcript(
                sid, self.replica_id, epoch, list(final.turn_tokens or []), count_turn=True, tenant=record.tenant,
                charge_tokens=final.prompt_tokens + final.completion_tokens, turn=turn,
            )
        except (Fenced, SessionNotFound) as err:
            await self.on_lost(sid)
            raise type(err)(f"turn not recorded: {err.message}") from None
        except STORE_ERRORS:
            logger.warning("transcript append for %s failed", sid, exc_info=True)
            await self.drop(sid)
            raise StoreUnavailable("turn not recorded: the session store is unavailable") from None

    async def _cache_entries(self, session_id: str) -> int:
        try:
            view = await self.loop.submit(ViewSession(session_id))
        except ReplicaUnavailable:
            return 0
        return view.cache_entries if view is not None else 0

    async def drop(self, session_id: str, reason: BaseException | None = None) -> bool:
        """Take the session out of the engine (aborting a running turn); its transcript stays."""
        try:
            dropped = await self.loop.submit(CloseSession(session_id, reason))
        except ReplicaUnavailable:
            return False
        await self.admission.released()
        return dropped
