"""The gateway's side of Ray Serve: calls to the replica deployment through a DeploymentHandle.

Whatever fails comes out as a ``sinkserve.errors`` error with a short, client-safe message (the details go to the
log): a replica's own error is unwrapped from Ray's wrapper, Serve's back-pressure is ResourceExhausted with a
retry hint, a dead or missing replica is ReplicaUnavailable, anything else is Internal. A call that reaches a
replica which no longer owns the session (``NotOwner``), or that finds no replica able to answer (UNAVAILABLE),
is re-sent within a retry budget: the request router then places the session on a live owner. Once a turn has
streamed output it is never re-sent (the client would see text twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from sinkserve.errors import (
    Internal,
    NotOwner,
    ReplicaUnavailable,
    ResourceExhausted,
    SinkServeError,
    Status,
    find_error,
)
from sinkserve.protocol import GenerationParams, SessionView, TurnEvent, TurnProgress
from sinkserve.replica import DEPLOYMENT_NAME

logger = logging.getLogger("sinkserve.gateway")

# A replica that just died stays in the handle's replica list until Serve notices; keep re-sending for this
# long (backing off) before answering UNAVAILABLE.
RETRY_BUDGET_S = 20.0
RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)
BACK_PRESSURE_RETRY_S = 1.0


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


def _unavailable_types() -> tuple[type, ...]:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    names = (
        (ray_exc, ("RayActorError", "ActorUnavailableError", "RaySystemError", "GetTimeoutError", "WorkerCrashedError",
                   "NodeDiedError", "LocalRayletDiedError", "OwnerDiedError", "ObjectLostError")),
        (serve_exc, ("DeploymentUnavailableError", "ReplicaUnavailableError", "RayServeException")),
    )
    found = tuple(getattr(module, name) for module, attrs in names for name in attrs if hasattr(module, name))
    return found + (ConnectionError, TimeoutError)


def to_error(err: BaseException, what: str = "call") -> SinkServeError:
    """The sinkserve error for whatever a handle call raised (the details are logged, not returned)."""
    found = find_error(err)
    if found is not None:
        return found
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    back_pressure = getattr(serve_exc, "BackPressureError", None)
    if back_pressure is not None and isinstance(err, back_pressure):
        return ResourceExhausted("the model replicas are at their request limit; retry shortly",
                                 retry_after_s=getattr(err, "retry_after_s", None) or BACK_PRESSURE_RETRY_S)
    if isinstance(err, _unavailable_types()):
        logger.info("%s: no replica available: %s: %s", what, type(err).__name__, _short(err))
        return ReplicaUnavailable("no model replica is available; retry shortly")
    if isinstance(err, ray_exc.RayTaskError):
        logger.warning("%s: the replica failed: %s", what, _short(err))
        return Internal("the model replica failed")
    logger.warning("%s: unexpected failure: %s: %s", what, type(err).__name__, _short(err), exc_info=err)
    return Internal("internal error")


def _short(err: BaseException) -> str:
    return str(err)[:2000]


def _retryable(err: SinkServeError) -> bool:
    return isinstance(err, NotOwner) or err.status is Status.UNAVAILABLE


def _gave_up(err: SinkServeError) -> SinkServeError:
    """What the client gets once the retry budget is spent."""
    if isinstance(err, NotOwner):
        return ReplicaUnavailable("the session's replica could not be settled; retry shortly")
    return err


class ServeBackend:
    """Thin async wrapper over the replica deployment's handle; raises sinkserve.errors only."""

    def __init__(self, handle: Any, call_timeout_s: float = 60.0, retry_budget_s: float = RETRY_BUDGET_S):
        self.handle = handle
        # Bounds a unary call and each wait for a turn's next event before its text starts (a live replica sends a
        # TurnProgress every few seconds meanwhile): with no replica running (app not deployed yet, cluster down)
        # a handle call would wait forever, while a long message being ingested must not be cut.
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
        what = f"{method}({kwargs.get('session_id')})"
        while True:
            try:
                response = getattr(self.handle, method).remote(**kwargs)
                async with asyncio.timeout(self.call_timeout_s):  # not wait_for: see _first_event
                    return await response
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - every Ray failure becomes a sinkserve error
                failure = to_error(err, what)
                if not _retryable(failure):
                    raise failure from None
                logger.info("%s attempt %d: %s", what, retry.attempt + 1, failure.message)
                if not await retry.wait():
                    raise _gave_up(failure) from None

    async def create(self, session_id: str) -> SessionView:
        return await self._unary("create", session_id=session_id)

    async def info(self, session_id: str) -> SessionView:
        return await self._unary("info", session_id=session_id)

    async def delete(self, session_id: str) -> bool:
        return await self._unary("delete", session_id=session_id)

    async def chat(
        self, session_id: str, text: str, params: GenerationParams, deadline_unix: float | None,
        turn_id: str | None = None, request_id: str | None = None,
    ) -> AsyncIterator[TurnEvent]:
        """Stream one turn's events. Cancelling the consumer cancels the replica's generator (it aborts the turn).
        `turn_id` names the turn's session lock, which the replica watches (a turn whose lock lapsed, its gateway
        gone, is stopped); `request_id`, the client's idempotency key, is recorded with the turn."""
        streaming = self.handle.options(stream=True)
        retry = _Retry(self.retry_budget_s)
        what = f"chat({session_id})"
        while True:
            generator = streaming.chat.remote(
                session_id=session_id, text=text, params=params, deadline_unix=deadline_unix, turn_id=turn_id,
                request_id=request_id,
            )
            produced = False
            try:
                while True:
                    try:
                        event = await (generator.__anext__() if produced else self._first_event(generator))
                    except StopAsyncIteration:
                        return
                    if isinstance(event, TurnProgress):  # alive, no text yet: the wait for text starts again
                        continue
                    produced = True
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                generator.cancel()
                raise
            except Exception as err:  # noqa: BLE001
                generator.cancel()
                failure = to_error(err, what)
                if produced or not _retryable(failure):
                    raise failure from None
                logger.info("%s attempt %d: %s", what, retry.attempt + 1, failure.message)
                if not await retry.wait():
                    raise _gave_up(failure) from None

    async def _first_event(self, generator: Any) -> Any:
        # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a cancellation that arrives just as
        # the awaited call finishes (CPython gh-86296), and a client hang-up must never be lost.
        async with asyncio.timeout(self.call_timeout_s):
            return await generator.__anext__()
