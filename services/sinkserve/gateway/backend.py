"""The gateway's side of Ray Serve: calls to the replica deployment through a DeploymentHandle.

Every Ray failure comes out as a ``ReplicaError`` with the gRPC status to answer. A call that reaches a
replica which no longer owns the session (``NOT_OWNER``), or a replica that died before it produced
anything, is re-sent: the request router then places the session on a live owner. Once a turn has
streamed output it is never re-sent (the client would see text twice).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from sinkserve.replica import DEPLOYMENT_NAME
from sinkserve.replica.errors import (
    INTERNAL,
    NOT_OWNER,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    ReplicaError,
    unwrap,
)

logger = logging.getLogger("sinkserve.gateway")

RETRIES = 4
RETRY_BACKOFF_S = 0.25


def to_replica_error(err: BaseException) -> ReplicaError:
    found = unwrap(err)
    if found is not None:
        return found
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    if isinstance(err, getattr(serve_exc, "BackPressureError", ())):
        return ReplicaError(RESOURCE_EXHAUSTED, "the model replicas are at their request limit; retry shortly")
    unavailable: tuple[type, ...] = (
        ray_exc.RayActorError,
        ray_exc.ActorUnavailableError,
        ray_exc.RaySystemError,
        ray_exc.GetTimeoutError,
        ConnectionError,
        TimeoutError,
    )
    for name in ("DeploymentUnavailableError", "RayServeException"):
        if hasattr(serve_exc, name):
            unavailable += (getattr(serve_exc, name),)
    if isinstance(err, unavailable):
        return ReplicaError(UNAVAILABLE, f"model replica unavailable: {type(err).__name__}: {err}")
    if isinstance(err, ray_exc.RayTaskError):
        return ReplicaError(INTERNAL, f"replica failed: {err}")
    return ReplicaError(UNAVAILABLE, f"{type(err).__name__}: {err}")


def _retryable(err: ReplicaError) -> bool:
    return err.status in (NOT_OWNER, UNAVAILABLE)


class ServeBackend:
    """Thin async wrapper over the replica deployment's handle."""

    def __init__(self, handle: Any, call_timeout_s: float = 60.0):
        self.handle = handle
        self.call_timeout_s = call_timeout_s

    @classmethod
    def connect(cls, app_name: str) -> "ServeBackend":
        from ray import serve

        return cls(serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name))

    async def _unary(self, method: str, **kwargs: Any) -> Any:
        last: ReplicaError | None = None
        for attempt in range(RETRIES):
            try:
                response = getattr(self.handle, method).remote(**kwargs)
                return await asyncio.wait_for(response, self.call_timeout_s)
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # noqa: BLE001 - every Ray failure maps to a status
                last = to_replica_error(err)
                if not _retryable(last):
                    raise last from None
                logger.info("%s(%s) attempt %d: %s", method, kwargs.get("session_id"), attempt + 1, last)
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        assert last is not None
        raise ReplicaError(UNAVAILABLE, last.message) from None

    async def create(self, session_id: str) -> dict:
        return await self._unary("create", session_id=session_id)

    async def info(self, session_id: str) -> dict:
        return await self._unary("info", session_id=session_id)

    async def delete(self, session_id: str) -> bool:
        return await self._unary("delete", session_id=session_id)

    async def chat(
        self, session_id: str, text: str, params: dict, deadline_unix: float | None
    ) -> AsyncIterator[dict]:
        """Stream one turn's events. Cancelling the consumer cancels the replica's generator (it aborts the turn)."""
        streaming = self.handle.options(stream=True)
        last: ReplicaError | None = None
        for attempt in range(RETRIES):
            generator = streaming.chat.remote(
                session_id=session_id, text=text, params=params, deadline_unix=deadline_unix
            )
            produced = False
            try:
                async for event in generator:
                    produced = True
                    yield event
                return
            except (asyncio.CancelledError, GeneratorExit):
                generator.cancel()
                raise
            except BaseException as err:  # noqa: BLE001
                generator.cancel()
                last = to_replica_error(err)
                if produced or not _retryable(last):
                    raise last from None
                logger.info("chat(%s) attempt %d: %s", session_id, attempt + 1, last)
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        assert last is not None
        raise ReplicaError(UNAVAILABLE, last.message) from None
