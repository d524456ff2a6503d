"""The replica: one engine, its batching loop, and the session bookkeeping around it.

Ray Serve builds one ``SinkServeReplica`` per replica (``sinkserve.replica.app`` wraps it in a deployment).
The gateway calls it through a DeploymentHandle whose request router (``sinkserve.router``) sends every
call to the session's owner. Methods take keyword arguments, ``session_id`` always among them: the router
reads it to pick the replica.

Sessions here are in one of three states: *owned* (the registry names this replica, with an epoch that
fences it), *resident* (the engine holds its KV cache in a slab slot) and *active* (a turn is running).
An idle resident session gives its slot up (least recently used first) when a turn needs one: it is
*parked*, its cache copied to host memory bit for bit, and resumes from there on its next turn. Parked
caches are bounded (``replica.park_host_bytes``); past the bound the least recently used parked session is
dropped, and a session owned but neither resident nor parked is rebuilt from its transcript. When every
slot is generating, a turn waits (bounded queue, bounded time) for one to free up, then gets
RESOURCE_EXHAUSTED with a retry hint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator

from sinkserve.config import Settings
from sinkserve.replica.errors import (
    ABORTED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    NOT_OWNER,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    ReplicaError,
)
from sinkserve.replica.loop import EngineLoop, LoopDead
from sinkserve.router.registry import Fenced, LoadReport, Registry, SessionGone, SessionRecord

logger = logging.getLogger("sinkserve.replica")


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit use): any unique name will do
        return f"local-{uuid.uuid4().hex[:8]}"


class SinkServeReplica:
    async def __init__(self, settings: dict | Settings | None = None, engine: Any = None):
        self.settings = settings if isinstance(settings, Settings) else Settings.model_validate(settings or {})
        self.replica_id = _replica_id()
        if engine is None:
            from sinkserve.engine import load_engine

            if self.settings.engine.num_threads:
                import torch

                torch.set_num_threads(self.settings.engine.num_threads)
            engine = await asyncio.to_thread(load_engine, self.settings.engine)
        self.engine = engine
        self.loop = EngineLoop(engine).start()
        self.registry = Registry.from_config(self.settings.redis)
        self.owned: dict[str, int] = {}  # session -> epoch this replica holds it under
        self.resident: OrderedDict[str, int] = OrderedDict()  # session -> epoch of the cache; LRU order
        self.parked: OrderedDict[str, int] = OrderedDict()  # idle sessions whose cache waits in host memory
        self.active: set[str] = set()
        self._slots_lock = asyncio.Lock()
        self.draining = False
        self.rebuilt = 0
        self.evicted = 0  # parked caches dropped for the host-memory bound (rebuilt from transcripts later)
        self.parks = 0
        self.resumes = 0
        self._waiting = 0  # turns waiting for a slot
        self._slot_released = asyncio.Condition()
        self._metrics = _ReplicaMetrics(self.replica_id)
        self._lease_ms = int(self.settings.router.lease_ttl_s * 1000)
        self._beat_task = asyncio.get_running_loop().create_task(self._heartbeat())
        logger.info("replica %s ready (model %s, %d slots)", self.replica_id, engine.model_name, engine.max_sessions)

    # ------------------------------------------------------------------ Serve hooks
    async def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"engine loop is dead: {self.loop.error!r}")
        if self._beat_task.done():
            raise RuntimeError(f"heartbeat task ended: {self._beat_task.exception()!r}")

    async def __del__(self) -> None:
        # Graceful shutdown (scale-down, redeploy): hand every session back so routers re-home them now
        # instead of waiting for the leases to lapse. Their transcripts make the move lossless.
        self.draining = True
        try:
            await self._report_load()
            await self.registry.release(self.replica_id, dict(self.owned))
            await self.registry.drop_report(self.replica_id)
        except Exception:  # noqa: BLE001 - best effort: the leases lapse anyway
            logger.warning("could not release sessions on shutdown", exc_info=True)
        self._beat_task.cancel()
        self.loop.stop()

    # ------------------------------------------------------------------ API (called through the handle)
    async def create(self, session_id: str) -> dict:
        """Take ownership of a new session and give it a slot if one is free (else on its first turn)."""
        record = await self._record(session_id)
        epoch = await self._ensure_owner(record)
        if self.engine.free_slots > 0 and session_id not in self.resident:
            await self._ensure_resident(record, epoch)
        return await self.info(session_id=session_id)

    async def chat(
        self,
        session_id: str,
        text: str,
        params: dict,
        deadline_unix: float | None = None,
    ) -> AsyncIterator[dict]:
        """One turn: yields {"delta": text}..., then {"final": {...}} once the turn is in the transcript."""
        from sinkserve.engine import SamplingParams

        if session_id in self.active:
            raise ReplicaError(ABORTED, f"session {session_id} is still replying to a previous message")
        self.active.add(session_id)
        try:
            record = await self._record(session_id)
            epoch = await self._ensure_owner(record)
            await self._ensure_resident(record, epoch, deadline_unix)
            sampling = SamplingParams(**params)
            out_queue: asyncio.Queue = asyncio.Queue()
            event_loop = asyncio.get_running_loop()

            def start_turn(engine: Any) -> None:
                engine.add_message(session_id, text, sampling)
                self.loop.subscribe(session_id, event_loop, out_queue)

            try:
                await self.loop.call(start_turn)
            except Exception as err:  # noqa: BLE001 - engine refusals and a dead loop map to statuses
                raise _map_engine_error(err) from None
            async for event in self._stream_turn(session_id, record.tenant, epoch, out_queue, deadline_unix):
                yield event
        finally:
            self.active.discard(session_id)
            async with self._slot_released:  # a slot may be parkable now
                self._slot_released.notify_all()

    async def info(self, session_id: str) -> dict:
        """The engine's view of a session (cache occupancy) plus which replica answered."""
        out: dict[str, Any] = {
            "replica": self.replica_id,
            "resident": False,
            "cache_entries": 0,
            "cache_capacity": self._capacity(),
            "busy": session_id in self.active,
            "parked": session_id in self.parked,
        }
        if session_id in self.resident or session_id in self.parked:
            info = await self.loop.call(lambda engine: engine.session_info(session_id))
            out.update(
                resident=session_id in self.resident,
                cache_entries=info.cache_entries,
                cache_capacity=info.cache_capacity,
                tokens_seen=info.tokens_seen,
                busy=info.busy or out["busy"],
            )
        return out

    async def delete(self, session_id: str) -> bool:
        """Forget a session (the gateway already removed it from the registry)."""
        self.owned.pop(session_id, None)
        return await self._drop(session_id)

    async def stats(self) -> dict:
        return self._load().__dict__

    # ------------------------------------------------------------------ turn streaming
    async def _stream_turn(
        self, session_id: str, tenant: str, epoch: int, out_queue: asyncio.Queue, deadline_unix: float | None
    ) -> AsyncIterator[dict]:
        final = None
        try:
            while True:
                timeout = None if deadline_unix is None else max(0.0, deadline_unix - time.time())
                try:
                    out = await asyncio.wait_for(out_queue.get(), timeout)
                except TimeoutError:
                    raise ReplicaError(DEADLINE_EXCEEDED, "the turn ran past its deadline and was stopped") from None
                if isinstance(out, ReplicaError):
                    raise out
                if isinstance(out, BaseException):
                    raise ReplicaError(UNAVAILABLE, f"replica engine failed: {out}")
                if out.finished:
                    final = out
                    break
                if out.text:
                    yield {"delta": out.text}
        except BaseException:
            if final is None:
                # Cancelled (client hang-up, deadline) or failed: stop generating now and record the part
                # of the reply the cache holds, so the transcript and the cache stay the same.
                await asyncio.shield(self._abort_and_record(session_id, tenant, epoch, out_queue))
            raise
        turns = await self._commit(session_id, tenant, epoch, final)
        yield {"final": await self._final_event(session_id, final, turns)}

    async def _abort_and_record(self, session_id: str, tenant: str, epoch: int, out_queue: asyncio.Queue) -> None:
        self.loop.unsubscribe(session_id)
        try:
            final = await self.loop.call(lambda engine: engine.abort_turn(session_id))
        except Exception:  # noqa: BLE001 - the loop died or the session is gone
            logger.warning("abort of %s failed; dropping its cache", session_id, exc_info=True)
            await self._drop(session_id)
            return
        while final is None and not out_queue.empty():  # the turn ended on its own just before the abort
            item = out_queue.get_nowait()
            if not isinstance(item, BaseException) and item.finished:
                final = item
        if final is None:  # nothing to record and no way to tell what the cache holds: rebuild it later
            await self._drop(session_id)
            return
        try:
            await self._commit(session_id, tenant, epoch, final)
        except Exception:  # noqa: BLE001 - _commit already dropped the cache
            logger.warning("could not record the aborted turn of %s", session_id, exc_info=True)

    async def _commit(self, session_id: str, tenant: str, epoch: int, final: Any) -> int:
        """Append the turn's tokens to the transcript (and charge the tenant); if that fails the cache is
        dropped, to be rebuilt from the log."""
        try:
            return await self.registry.append_transcript(
                session_id,
                self.replica_id,
                epoch,
                list(final.turn_tokens or []),
                count_turn=True,
                tenant=tenant,
                charge_tokens=final.prompt_tokens + final.completion_tokens,
            )
        except (Fenced, SessionGone) as err:
            await self._drop(session_id)
            self.owned.pop(session_id, None)
            status = NOT_FOUND if isinstance(err, SessionGone) else UNAVAILABLE
            raise ReplicaError(status, f"turn not recorded: {err}") from None
        except Exception as err:  # noqa: BLE001 - Redis down: the turn is not acknowledged
            await self._drop(session_id)
            raise ReplicaError(UNAVAILABLE, f"turn not recorded (session store unavailable): {err}") from None

    async def _final_event(self, session_id: str, final: Any, turns: int) -> dict:
        try:
            info = await self.loop.call(lambda engine: engine.session_info(session_id))
            cache_entries = info.cache_entries
        except Exception:  # noqa: BLE001 - informational only
            cache_entries = 0
        return {
            "text": final.text or "",  # text held back until the last step (a stop-string prefix that was not one)
            "finish_reason": final.finish_reason or "eos",
            "prompt_tokens": final.prompt_tokens,
            "completion_tokens": final.completion_tokens,
            "turn": turns,
            "replica": self.replica_id,
            "cache_entries": cache_entries,
        }

    # ------------------------------------------------------------------ ownership and residency
    async def _record(self, session_id: str) -> SessionRecord:
        try:
            return await self.registry.get_session(session_id)
        except SessionGone:
            raise ReplicaError(NOT_FOUND, f"session {session_id} not found") from None
        except Exception as err:  # noqa: BLE001
            raise ReplicaError(UNAVAILABLE, f"session store unavailable: {err}") from None

    async def _ensure_owner(self, record: SessionRecord) -> int:
        sid = record.session_id
        if record.owner == self.replica_id:
            epoch = record.epoch
        elif record.owner == "":
            epoch, owner = await self.registry.claim(sid, record.epoch, self.replica_id, self._lease_ms)
            if epoch < 0:
                raise ReplicaError(NOT_FOUND, f"session {sid} not found")
            if owner != self.replica_id:
                await self._disown(sid)
                raise ReplicaError(NOT_OWNER, f"session {sid} is owned by {owner}")
        else:
            await self._disown(sid)
            raise ReplicaError(NOT_OWNER, f"session {sid} is owned by {record.owner}")
        self.owned[sid] = epoch
        return epoch

    async def _disown(self, session_id: str) -> None:
        """The session moved to another replica: our copy of its cache must never serve again."""
        self.owned.pop(session_id, None)
        await self._drop(session_id)

    async def _ensure_resident(self, record: SessionRecord, epoch: int, deadline_unix: float | None = None) -> None:
        sid = record.session_id
        if self.resident.get(sid) == epoch:
            self.resident.move_to_end(sid)
            return
        # A parked cache under the current epoch resumes bit-exact; anything else is rebuilt from the log.
        read_log = self.parked.get(sid) != epoch
        transcript = await self._transcript_ends(sid) if read_log else ([], 0)

        # One residency change at a time: two turns must not both count the same free slot.
        async with self._slots_lock:
            held = self.resident.get(sid)
            if held == epoch:
                self.resident.move_to_end(sid)
                return
            if held is not None or self.parked.get(sid, epoch) != epoch:
                await self._drop(sid)  # held under an older epoch: another replica served it since
            resume = self.parked.get(sid) == epoch
            if not resume and not read_log:  # its parked cache was dropped meanwhile
                transcript = await self._transcript_ends(sid)
            token_ids, total_tokens = transcript
            system_prompt = record.system_prompt or None

            victim = await self._evict_for_slot(deadline_unix)
            victim_epoch = None
            if victim is not None:
                # Out of `resident` before the engine call: a turn on the victim arriving meanwhile must take
                # the slow path (and this lock) instead of finding it resident and starting on a parked cache.
                victim_epoch = self.resident.pop(victim)

            def load(engine: Any) -> tuple[bool, BaseException | None]:
                # Park the victim and load this session in one trip to the engine thread.
                parked = False
                if victim is not None:
                    try:
                        engine.park(victim)
                        parked = True
                    except Exception:  # noqa: BLE001 - it became busy meanwhile: no slot for us then
                        pass
                try:
                    if resume:
                        engine.unpark(sid)
                    elif token_ids:
                        engine.import_session(sid, token_ids, total_tokens)
                    else:
                        engine.open_session(session_id=sid, system_prompt=system_prompt)
                except Exception as err:  # noqa: BLE001 - mapped below, after the bookkeeping
                    return parked, err
                return parked, None

            try:
                parked, failure = await self.loop.call(load)
            except LoopDead as err:
                raise ReplicaError(UNAVAILABLE, str(err)) from None
            if parked:
                await self._note_parked(victim, victim_epoch)
            elif victim is not None:
                self.resident[victim] = victim_epoch
            if failure is not None:
                raise _map_engine_error(failure)
            if resume:
                del self.parked[sid]
                self.resumes += 1
                self._metrics.count("resumes")
            elif token_ids:
                self.rebuilt += 1
                self._metrics.count("rebuilds")
            self.resident[sid] = epoch

    async def _transcript_ends(self, sid: str) -> tuple[list[int], int]:
        """What a rebuild reads: the transcript's first `sinks` and last `window` ids (whole entries from both
        ends, never the middle of a long log) and its length."""
        return await self.registry.transcript_ends(sid, self.engine.sinks, self.engine.window)

    async def _evict_for_slot(self, deadline_unix: float | None = None) -> str | None:
        """Find a slot: None when one is free, else the least recently used idle session to park (the
        caller parks it in the same engine call that loads its own session). Waits for a session to go
        idle when every slot is generating."""
        if self.engine.free_slots > 0:
            return None
        cfg = self.settings.replica
        if self._waiting >= cfg.admission_queue:
            raise ReplicaError(
                RESOURCE_EXHAUSTED, "every cache slot is generating and the wait queue is full", retry_after_s=1.0
            )
        give_up = time.monotonic() + cfg.admission_timeout_s
        if deadline_unix is not None:
            give_up = min(give_up, time.monotonic() + max(0.0, deadline_unix - time.time()))
        self._waiting += 1
        try:
            while True:
                if self.engine.free_slots > 0:
                    return None
                victim = next((sid for sid in self.resident if sid not in self.active), None)
                if victim is not None:
                    return victim
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    raise ReplicaError(
                        RESOURCE_EXHAUSTED,
                        f"every cache slot on this replica is generating (waited {cfg.admission_timeout_s:.0f}s "
                        "at most); retry shortly",
                        retry_after_s=1.0,
                    )
                async with self._slot_released:
                    try:
                        await asyncio.wait_for(self._slot_released.wait(), min(remaining, 1.0))
                    except TimeoutError:
                        pass
        finally:
            self._waiting -= 1

    async def _note_parked(self, session_id: str, epoch: int) -> None:
        """Bookkeeping after the engine parked an idle session; keeps parked caches within the host bound."""
        self.parked[session_id] = epoch
        self.parks += 1
        self._metrics.count("parks")
        bound = self.settings.replica.park_host_bytes // max(1, int(self.engine.bytes_per_session))
        while len(self.parked) > bound:
            oldest = next((sid for sid in self.parked if sid not in self.active), None)
            if oldest is None:  # every parked session is about to resume
                break
            await self._drop(oldest)
            self.evicted += 1
            self._metrics.count("drops")

    async def _drop(self, session_id: str) -> bool:
        """Take the session out of the engine (aborting a running turn); its transcript stays."""
        if session_id in self.parked:
            del self.parked[session_id]

            def close_parked(engine: Any) -> None:
                try:
                    engine.close_session(session_id)
                except Exception:  # noqa: BLE001 - already gone
                    pass

            try:
                await self.loop.call(close_parked)
            except LoopDead:
                pass
            return True
        if session_id not in self.resident:
            return False
        del self.resident[session_id]
        # A turn still streaming ends with this error instead of waiting for a final event that never comes.
        self.loop.unsubscribe(session_id, ReplicaError(NOT_FOUND, f"session {session_id} was closed on this replica"))

        def close(engine: Any) -> None:
            try:
                if engine.session_info(session_id).busy:
                    engine.abort_turn(session_id)
            except Exception:  # noqa: BLE001 - already gone
                pass
            try:
                engine.close_session(session_id)
            except Exception:  # noqa: BLE001
                pass

        try:
            await self.loop.call(close)
        except LoopDead:
            pass
        return True

    def _capacity(self) -> int:
        return int(self.engine.capacity)

    # ------------------------------------------------------------------ load reports and leases
    def _load(self) -> LoadReport:
        return LoadReport(
            replica_id=self.replica_id,
            sessions=len(self.resident),
            owned=len(self.owned),
            free_slots=self.engine.free_slots,
            max_sessions=self.engine.max_sessions,
            queue=self.loop.active_turns + self.loop.pending_calls,
            draining=self.draining,
            model=str(self.engine.model_name),
            extra={
                "resident": len(self.resident),
                "parked": len(self.parked),
                "parks": self.parks,
                "resumes": self.resumes,
                "rebuilt": self.rebuilt,
                "evicted": self.evicted,
                "waiting": self._waiting,
                "steps": self.loop.steps,
                "pid": os.getpid(),
            },
        )

    async def _report_load(self) -> None:
        interval = self.settings.replica.load_report_interval_s
        self._metrics.gauges(
            resident=len(self.resident),
            parked=len(self.parked),
            active=len(self.active),
            waiting=self._waiting,
            free_slots=self.engine.free_slots,
        )
        await self.registry.report_load(self._load(), ttl_ms=int(max(3 * interval, 5) * 1000))

    async def _heartbeat(self) -> None:
        interval = self.settings.replica.load_report_interval_s
        renew_every = max(self.settings.router.lease_ttl_s / 3, interval)
        next_renew = 0.0
        while True:
            try:
                await self._report_load()
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + renew_every
                    await self._renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis blips must not kill the replica
                logger.warning("heartbeat failed", exc_info=True)
            await asyncio.sleep(interval)

    async def _renew_leases(self) -> None:
        results = await self.registry.renew(self.replica_id, dict(self.owned), self._lease_ms)
        for sid, result in results.items():
            if result != 1:  # fenced (moved elsewhere) or deleted: our copy must never serve again
                self.owned.pop(sid, None)
                if sid not in self.active:
                    await self._drop(sid)


def _map_engine_error(err: BaseException) -> ReplicaError:
    from sinkserve.engine import ContextOverflow, InvalidRequest, NoFreeSlot, SessionBusy, SessionNotFound

    if isinstance(err, ReplicaError):
        return err
    if isinstance(err, InvalidRequest):
        return ReplicaError(INVALID_ARGUMENT, str(err))
    if isinstance(err, SessionBusy):
        return ReplicaError(ABORTED, str(err))
    if isinstance(err, (NoFreeSlot, ContextOverflow)):
        return ReplicaError(RESOURCE_EXHAUSTED, str(err))
    if isinstance(err, SessionNotFound):
        return ReplicaError(NOT_FOUND, str(err))
    if isinstance(err, LoopDead):
        return ReplicaError(UNAVAILABLE, str(err))
    return ReplicaError(INTERNAL, f"{type(err).__name__}: {err}")


class _ReplicaMetrics:
    """Prometheus metrics through Ray's metrics API (exported by every Ray node's metrics endpoint)."""

    def __init__(self, replica_id: str):
        self.tags = {"replica": replica_id}
        try:
            from ray.util import metrics
        except ImportError:  # pragma: no cover - the replica always runs with Ray installed
            self._sessions = None
            return
        keys = ("replica",)
        self._sessions = metrics.Gauge(
            "sinkserve_replica_sessions", "sessions on this replica by state", tag_keys=("replica", "state")
        )
        self._free = metrics.Gauge("sinkserve_replica_free_slots", "free KV slab slots", tag_keys=keys)
        self._waiting = metrics.Gauge("sinkserve_replica_waiting_turns", "turns waiting for a slot", tag_keys=keys)
        self._counters = {
            name: metrics.Counter(f"sinkserve_replica_{name}_total", help_text, tag_keys=keys)
            for name, help_text in (
                ("parks", "idle sessions whose cache moved to host memory"),
                ("resumes", "parked sessions resumed from host memory"),
                ("rebuilds", "sessions rebuilt from their transcript"),
                ("drops", "parked caches dropped for the host-memory bound"),
            )
        }

    def count(self, name: str) -> None:
        if self._sessions is not None:
            self._counters[name].inc(1, tags=self.tags)

    def gauges(self, resident: int, parked: int, active: int, waiting: int, free_slots: int) -> None:
        if self._sessions is None:
            return
        for state, value in (("resident", resident), ("parked", parked), ("active", active)):
            self._sessions.set(value, tags={**self.tags, "state": state})
        self._free.set(free_slots, tags=self.tags)
        self._waiting.set(waiting, tags=self.tags)
