"""Ray Serve request router that keeps every session on the replica holding its cache.

Serve runs one instance of this class inside each process that holds a DeploymentHandle to the replica
deployment (every gateway). All of them read the same store in Redis, so they agree on owners:

- the session has an owner that Serve lists as running and that is not draining -> that replica only;
- otherwise (a new session, or its owner died / is draining / released it) the session is re-homed: the
  replica ``placement.pick_replica`` chooses is claimed in the store, which bumps the session's epoch so
  that the old owner, should it still be alive, is fenced out. The new owner rebuilds the cache from the
  transcript on the first turn.

Only ``create`` and ``chat`` calls move sessions; ``info`` and ``delete`` of a session without a live owner
go to any replica (which answers "not resident").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from sinkserve.config import RedisConfig
from sinkserve.errors import SessionNotFound
from sinkserve.routing.placement import keeps_owner, pick_replica
from sinkserve.store import Store

logger = logging.getLogger("sinkserve.routing")

ROUTER_CLASS = "sinkserve.routing.request_router:SessionAffinityRouter"
# Calls that may give a session a new owner.
PLACING_METHODS = frozenset({"create", "chat"})


class SessionAffinityRouter(RequestRouter):
    def initialize_state(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        redis_password: str | None = None,
        key_prefix: str = "sinkserve",
        socket_timeout_s: float = 5.0,
        load_factor: float = 1.25,
        lease_ttl_s: float = 30.0,
        **_: Any,
    ) -> None:
        self._redis_config = RedisConfig(
            url=redis_url, password=redis_password, key_prefix=key_prefix, socket_timeout_s=socket_timeout_s
        )
        self._load_factor = load_factor
        self._lease_ms = int(lease_ttl_s * 1000)
        self._store_obj: Store | None = None
        self._placement_lock: asyncio.Lock | None = None

    def _store(self) -> Store:
        # Created lazily: it must bind to the loop Serve runs the router on.
        if self._store_obj is None:
            self._store_obj = Store.from_config(self._redis_config)
            self._placement_lock = asyncio.Lock()
        return self._store_obj

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        session_id = pending_request.kwargs.get("session_id") if pending_request is not None else None
        if not session_id or not candidate_replicas:
            return [candidate_replicas]
        try:
            return [[await self._route(session_id, pending_request.metadata.call_method, candidate_replicas)]]
        except _AnyReplica:
            return [candidate_replicas]
        except Exception:  # noqa: BLE001 - Redis down: any replica answers UNAVAILABLE for us
            logger.warning("session routing failed for %s", session_id, exc_info=True)
            return [candidate_replicas]

    async def _route(self, session_id: str, method: str, candidates: list[RunningReplica]) -> RunningReplica:
        store = self._store()
        by_id = {replica.replica_id.unique_id: replica for replica in candidates}
        try:
            record = await store.sessions.get_session(session_id)
        except SessionNotFound:
            raise _AnyReplica from None  # the replica answers NOT_FOUND
        loads = await store.replicas.loads(list(by_id))
        if keeps_owner(record.owner, loads):
            return by_id[record.owner]
        if method not in PLACING_METHODS:
            raise _AnyReplica
        assert self._placement_lock is not None
        async with self._placement_lock:  # one placement at a time per process, so loads are fresh
            record = await store.sessions.get_session(session_id)
            if keeps_owner(record.owner, loads):
                return by_id[record.owner]  # another request placed it meanwhile
            loads = await store.replicas.loads(list(by_id))
            target = pick_replica(session_id, loads, self._load_factor)
            if target is None:
                raise _AnyReplica
            epoch, owner = await store.ownership.claim(session_id, record.epoch, target, self._lease_ms)
        if epoch < 0:
            raise _AnyReplica
        if owner != target:
            logger.info("session %s was claimed by %s first", session_id, owner)
        if owner in by_id:
            if record.owner:
                logger.info("re-homed session %s from %s to %s (epoch %d)", session_id, record.owner, owner, epoch)
            return by_id[owner]
        raise _AnyReplica


class _AnyReplica(Exception):
    """No preference: let Serve pick among all candidates."""


def router_kwargs(settings: Any) -> dict:
    """``request_router_kwargs`` for the replica deployment, from a ``Settings``."""
    redis = settings.redis
    return {
        "redis_url": redis.url,
        "redis_password": redis.password.get_secret_value() if redis.password else None,
        "key_prefix": redis.key_prefix,
        "socket_timeout_s": redis.socket_timeout_s,
        "load_factor": settings.router.load_factor,
        "lease_ttl_s": settings.router.lease_ttl_s,
    }
