"""The gateway's side of Ray Serve: calls to the replica deployment through a DeploymentHandle.

Every Ray failure comes out as a ``ReplicaError`` with the gRPC status to answer. A call that reaches a
replica which no longer owns the session (``NOT_OWNER``), or a replica that died before it produced
anything, is re-sent: the request router then places the session on a live owner. Once a turn has
streamed output it is never re-sent (the client would see text twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
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

# A replica that just died stays in the handle's replica list until Serve notices; keep re-sending for this
# long (backing off) before answering UNAVAILABLE.
RETRY_BUDGET_S = 20.0
RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)


class _Retry:
    def __init__(self, budget_s: float = RETRY_BUDGET_S):
        self.deadline = time.monotonic() + budget_s
        self.attempt = 0

    async def wait(self) -> bool:
        """Sleep before the next attempt; False once the budget is spent."""
        delay = RETRY_BACKOFF_S[min(self.attempt, len(RETRY_BACKOFF_S) - 1)]
        self.attempt += 1
        if time.monotonic() + delay > self.deadline:
            return False
        await asyncio.sleep(delay)
        return True


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

    def __init__(self, handle: Any, call_timeout_s: float = 60.0, retry_budget_s: float = RETRY_BUDGET_S):
        self.handle = handle
        # Bounds a unary call and the wait for a turn's first event: with no replica running (app not
        # deployed yet, cluster down) a handle call would wait forever.
        self.call_timeout_s = call_timeout_s
        self.retry_budget_s = retry_budget_s

    @classmethod
    def connect(cls, app_name: str, **kwargs: Any) -> "ServeBackend":
        from ray import serve

        # No existence check: a gateway may start before the app is deployed (Kubernetes); calls made
        # before any replica runs answer UNAVAILABLE.
        return cls(serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name, _check_exists=False), **kwargs)

    async def _unary(self, method: str, **kwargs: Any) -> Any:
        retry = _Retry(self.retry_budget_s)
        while True:
            try:
                response = getattr(self.handle, method).remote(**kwargs)
                return await asyncio.wait_for(response, self.call_timeout_s)
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # noqa: BLE001 - every Ray failure maps to a status
                failure = to_replica_error(err)
                if not _retryable(failure):
                    raise failure from None
                logger.info("%s(%s) attempt %d: %s", method, kwargs.get("session_id"), retry.attempt + 1, failure)
                if not await retry.wait():
                    raise ReplicaError(UNAVAILABLE, failure.message) from None

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
        retry = _Retry(self.retry_budget_s)
        while True:
            generator = streaming.chat.remote(
                session_id=session_id, text=text, params=params, deadline_unix=deadline_unix
            )
            produced = False
            try:
                while True:
                    next_event = generator.__anext__()
                    try:
                        event = await (next_event if produced else asyncio.wait_for(next_event, self.call_timeout_s))
                    except StopAsyncIteration:
                        return
                    produced = True
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                generator.cancel()
                raise
            except BaseException as err:  # noqa: BLE001
                generator.cancel()
                failure = to_replica_error(err)
                if produced or not _retryable(failure):
                    raise failure from None
                logger.info("chat(%s) attempt %d: %s", session_id, retry.attempt + 1, failure)
                if not await retry.wait():
                    raise ReplicaError(UNAVAILABLE, failure.message) from None
