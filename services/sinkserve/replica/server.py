"""The replica: the Ray Serve deployment around one engine, its loop, and its store.

Ray Serve builds one ``SinkServeReplica`` per replica (``sinkserve.replica.app`` wraps it in a deployment); tests
construct it directly with an engine and a store of their own. The gateway calls it through a DeploymentHandle
whose request router (``sinkserve.routing``) sends every call to the session's owner, so every method takes
``session_id`` as a keyword argument. Answers are protocol types (SessionView, TurnDelta, TurnFinished); failures
are sinkserve.errors, which unpickle in a gateway without torch.

The parts: ``loop`` (the engine thread and its typed commands), ``turns`` (admission, residency, streaming,
transcript commits), ``ownership`` (epochs, leases, the heartbeat), ``metrics``. Where a session's cache lives
(a slot, host memory, nowhere) is the engine's to know; the replica asks it and keeps no copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sinkserve.config import Settings
from sinkserve.errors import ReplicaUnavailable, SessionNotFound, StoreUnavailable
from sinkserve.protocol import GenerationParams, SessionView, TurnEvent
from sinkserve.replica.loop import EngineLoop, Snapshot, ViewSession
from sinkserve.replica.metrics import ReplicaMetrics
from sinkserve.replica.ownership import Heartbeat, Ownership
from sinkserve.replica.turns import STORE_ERRORS, Turns
from sinkserve.store import LoadReport, SessionRecord, Store

logger = logging.getLogger("sinkserve.replica")


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests, local use): any unique name will do
        return f"local-{uuid.uuid4().hex[:8]}"


def _load_engine(settings: Settings):
    """The replica's engine; with replica.tensor_parallel N > 1 its model is split over N shards: this process is
    rank 0, the others Ray actors in the replica's placement group (replica/shards.py)."""
    import functools

    from sinkserve.engine import load_engine

    rc = settings.replica
    if rc.tensor_parallel == 1:
        return load_engine(settings.engine)
    from sinkserve.replica.shards import RayShards

    launcher = functools.partial(RayShards, num_cpus=rc.num_cpus, num_gpus=rc.num_gpus)
    return load_engine(settings.engine, tensor_parallel=rc.tensor_parallel,
                       oversubscribe=rc.tensor_parallel_oversubscribe, launcher=launcher)


class SinkServeReplica:
    async def __init__(self, settings: dict | Settings | None = None, engine: Any = None, store: Store | None = None,
                       replica_id: str | None = None):
        self.settings = settings if isinstance(settings, Settings) else Settings.model_validate(settings or {})
        self.replica_id = replica_id or _replica_id()
        if engine is None:
            engine = await asyncio.to_thread(_load_engine, self.settings)
        self.engine = engine
        self.loop = EngineLoop(engine).start()
        self.store = store or Store.from_config(self.settings.redis)
        self.draining = False
        self.metrics = ReplicaMetrics(self.replica_id)
        paths = getattr(engine, "paths", None)
        self.engine_paths = paths.as_dict() if paths is not None else {}
        self.metrics.engine_paths(self.engine_paths)
        lease_ttl_s = self.settings.router.lease_ttl_s
        self.ownership = Ownership(self.store, self.replica_id, lease_ttl_s)
        self.turns = Turns(self.loop, self.store, self.replica_id, self.settings.replica, self.metrics,
                           (engine.sinks, engine.window), on_lost=self._lost)
        self.heartbeat = Heartbeat(self.ownership, self.load_report, self._renew,
                                   self.settings.replica.load_report_interval_s, lease_ttl_s).start()
        logger.info("replica %s ready (model %s, %d slots); %s", self.replica_id, engine.model_name, engine.slots,
                    paths.line() if paths is not None else "engine built by hand")

    # ------------------------------------------------------------------ Serve hooks
    async def check_health(self) -> None:
        runner = getattr(self.engine, "runner", None)
        shards = getattr(runner, "launcher", None)
        lost = getattr(runner, "lost", None) or (shards.dead() if hasattr(shards, "dead") else None)
        if lost:
            raise RuntimeError(lost)  # Serve replaces the replica; its sessions are rebuilt from their transcripts
        if not self.loop.alive:
            raise RuntimeError(f"engine loop is dead: {self.loop.error!r}")
        if self.heartbeat.failed is not None:
            raise RuntimeError(f"heartbeat task ended: {self.heartbeat.failed!r}")

    async def __del__(self) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Graceful shutdown (scale-down, redeploy): hand every session back so routers re-home them now."""
        self.draining = True
        try:
            await self.heartbeat.publish()
            await self.ownership.release_all()
            await self.store.replicas.drop_report(self.replica_id)
        except Exception:  # noqa: BLE001 - best effort: the leases lapse anyway
            logger.warning("could not release sessions on shutdown", exc_info=True)
        self.heartbeat.stop()
        self.loop.stop()

    # ------------------------------------------------------------------ API (called through the handle)
    async def create(self, session_id: str) -> SessionView:
        """Take ownership of a new session and give it a slot if one is free (else on its first turn)."""
        record = await self._record(session_id)
        epoch = await self.ownership.ensure(record, self._lost)
        if self.engine.free_slots > 0:
            await self.turns.make_resident(record, epoch)
        return await self.info(session_id=session_id)

    async def chat(self, session_id: str, text: str, params: GenerationParams,
                   deadline_unix: float | None = None, turn_id: str | None = None,
                   request_id: str | None = None) -> AsyncIterator[TurnEvent]:
        """One turn: TurnDelta events, then TurnFinished once the turn is in the transcript. `turn_id`: the session
        lock the gateway holds for it (the turn stops once that lapses); `request_id`: recorded with the turn."""
        record = await self._record(session_id)
        epoch = await self.ownership.ensure(record, self._lost)
        async for event in self.turns.run(record, epoch, text, params, deadline_unix, turn_id=turn_id,
                                          request_id=request_id):
            yield event

    async def info(self, session_id: str) -> SessionView:
        """The engine's view of a session (cache occupancy), naming this replica."""
        view = await self.loop.submit(ViewSession(session_id))
        if view is None:
            return SessionView(session_id, self.replica_id, busy=session_id in self.turns.active,
                               cache_capacity=self.engine.capacity)
        return dataclasses.replace(view, replica=self.replica_id, busy=view.busy or session_id in self.turns.active)

    async def delete(self, session_id: str) -> bool:
        """Forget a session (the gateway removes it from the registry)."""
        self.ownership.owned.pop(session_id, None)
        return await self.turns.drop(session_id, SessionNotFound(f"session {session_id} was deleted"))

    async def stats(self) -> LoadReport:
        return await self.load_report()

    # ------------------------------------------------------------------ internals
    async def _record(self, session_id: str) -> SessionRecord:
        try:
            return await self.store.sessions.get_session(session_id)
        except STORE_ERRORS:
            logger.warning("session store unavailable", exc_info=True)
            raise StoreUnavailable("the session store is unavailable") from None

    async def _lost(self, session_id: str) -> None:
        """This replica no longer owns the session: its cache must never serve again."""
        self.ownership.owned.pop(session_id, None)
        await self.turns.drop(session_id, SessionNotFound(f"session {session_id} moved to another replica"))

    async def _renew(self) -> None:
        await self.ownership.renew(self._lost, self.turns.active)

    async def load_report(self) -> LoadReport:
        try:
            snapshot = await self.loop.submit(Snapshot())
        except ReplicaUnavailable:
            snapshot = None
        self_state = dict(owned=len(self.ownership.owned), queue=len(self.turns.active) + self.loop.pending,
                          draining=self.draining, model=str(self.engine.model_name), rebuilt=self.turns.rebuilt,
                          waiting=self.turns.admission.waiting, pid=os.getpid(), engine_paths=self.engine_paths)
        if snapshot is None:
            return LoadReport(replica_id=self.replica_id, slots=self.engine.slots, **self_state)
        self.metrics.publish(snapshot, active=len(self.turns.active), waiting=self.turns.admission.waiting)
        loop_totals = dataclasses.asdict(snapshot.totals)
        loop_totals.pop("steps")  # the snapshot's own count
        return LoadReport(
            replica_id=self.replica_id, sessions=snapshot.resident, free_slots=snapshot.free_slots,
            slots=snapshot.slots, parked=snapshot.parked, parks=snapshot.parks, unparks=snapshot.unparks,
            drops=snapshot.drops, steps=snapshot.steps, refused_early=self.metrics.counted("refused_early"),
            **loop_totals, **dataclasses.asdict(self.turns.totals), **self_state,
        )
