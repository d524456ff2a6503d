"""ServeBackend: Ray's failures become sinkserve errors, and calls are re-sent only before any output.

The DeploymentHandle is faked (a real one needs a Ray cluster and a deployed app; the integration tests use that);
the exceptions are Ray's real classes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray import exceptions as ray_exc
from ray.serve import exceptions as serve_exc

from sinkserve import errors
from sinkserve.gateway.backend import ServeBackend, to_error
from sinkserve.protocol import GenerationParams, SessionView, TurnDelta, TurnFinished

TRACEBACK = "Traceback (most recent call last):\n  File \"/srv/x.py\", line 1\nboom at 10.0.0.9:6379 pid=77"


def task_error(cause: BaseException) -> BaseException:
    return ray_exc.RayTaskError("chat", TRACEBACK, cause, pid=77, ip="10.0.0.9").as_instanceof_cause()


@pytest.mark.parametrize("raised, expected, status", [
    (task_error(errors.SessionBusy("session s is busy")), errors.SessionBusy, errors.Status.ABORTED),
    (task_error(errors.NotOwner("owned elsewhere")), errors.NotOwner, errors.Status.UNAVAILABLE),
    (errors.SessionNotFound("session s not found"), errors.SessionNotFound, errors.Status.NOT_FOUND),
    (ray_exc.RayActorError(actor_id="8a1f00c0ffee"), errors.ReplicaUnavailable, errors.Status.UNAVAILABLE),
    (ray_exc.ActorDiedError(), errors.ReplicaUnavailable, errors.Status.UNAVAILABLE),
    (TimeoutError(), errors.ReplicaUnavailable, errors.Status.UNAVAILABLE),
    (task_error(RuntimeError("boom")), errors.Internal, errors.Status.INTERNAL),
    (KeyError("surprise"), errors.Internal, errors.Status.INTERNAL),
], ids=["wrapped-busy", "wrapped-not-owner", "plain", "actor", "actor-died", "timeout", "task", "other"])
def test_to_error(raised, expected, status):
    err = to_error(raised)
    assert type(err) is expected and err.status is status
    for internal in ("Traceback", "10.0.0.9", "pid", "8a1f00c0ffee", "RuntimeError", "KeyError"):
        assert internal not in err.message


def test_back_pressure_is_resource_exhausted_with_a_retry_hint():
    err = to_error(serve_exc.BackPressureError(num_queued_requests=9, max_queued_requests=8))
    assert isinstance(err, errors.ResourceExhausted) and err.retry_after_s == 1.0
    err = to_error(serve_exc.BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=3.0))
    assert err.retry_after_s == 3.0


class FakeResponse:
    def __init__(self, outcome: Any):
        self.outcome = outcome

    def __await__(self):
        async def settle():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return settle().__await__()


class FakeStream:
    """A DeploymentResponseGenerator: events, then maybe an error."""

    def __init__(self, items: list[Any]):
        self.items = list(items)
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class FakeHandle:
    """Answers each attempt with the next scripted outcome; records the calls."""

    def __init__(self, outcomes: list[Any]):
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, dict]] = []
        self.streams: list[FakeStream] = []

    def options(self, stream: bool = False) -> "FakeHandle":
        return self

    def __getattr__(self, method: str):
        handle = self

        class Method:
            def remote(self, **kwargs):
                handle.calls.append((method, kwargs))
                outcome = handle.outcomes.pop(0)
                if isinstance(outcome, list):
                    stream = FakeStream(outcome)

                    def cancel():
                        stream.cancelled = True

                    stream.cancel = cancel
                    handle.streams.append(stream)
                    return stream
                return FakeResponse(outcome)

        return Method()


VIEW = SessionView("s", "r-2", resident=True)
FINISHED = TurnFinished("eos", 3, 2, 1, "r-2", 5)


async def test_not_owner_and_unavailable_are_re_sent():
    handle = FakeHandle([task_error(errors.NotOwner("moved")), ray_exc.RayActorError(), VIEW])
    backend = ServeBackend(handle, retry_budget_s=5)
    assert await backend.create("s") == VIEW
    assert [m for m, _ in handle.calls] == ["create"] * 3


async def test_other_errors_are_not_re_sent():
    handle = FakeHandle([task_error(errors.SessionNotFound("session s not found")), VIEW])
    with pytest.raises(errors.SessionNotFound):
        await ServeBackend(handle).info("s")
    assert len(handle.calls) == 1


async def test_the_retry_budget_ends_in_unavailable():
    handle = FakeHandle([task_error(errors.NotOwner("moved"))] * 50)
    with pytest.raises(errors.ReplicaUnavailable) as caught:
        await ServeBackend(handle, retry_budget_s=0.5).create("s")
    assert "retry" in caught.value.message
    assert 1 < len(handle.calls) < 50


async def test_a_unary_call_that_never_answers_is_unavailable():
    class Never:
        def __await__(self):
            return asyncio.get_running_loop().create_future().__await__()

    class Handle:
        class info:
            @staticmethod
            def remote(**kwargs):
                return Never()

    with pytest.raises(errors.ReplicaUnavailable):
        await ServeBackend(Handle(), call_timeout_s=0.1, retry_budget_s=0).info("s")


async def test_chat_passes_params_and_is_re_sent_only_before_output():
    params = GenerationParams(max_tokens=7, stop=("END",))
    handle = FakeHandle([[ray_exc.RayActorError()], [TurnDelta("a"), FINISHED]])
    events = [e async for e in ServeBackend(handle, retry_budget_s=5).chat("s", "hi", params, 123.0, turn_id="t-1",
                                                                          request_id="r-1")]
    assert events == [TurnDelta("a"), FINISHED]
    sent = dict(session_id="s", text="hi", params=params, deadline_unix=123.0, turn_id="t-1", request_id="r-1")
    assert [kw for _, kw in handle.calls] == [sent] * 2
    assert handle.streams[0].cancelled

    handle = FakeHandle([[TurnDelta("a"), ray_exc.RayActorError()], [TurnDelta("again"), FINISHED]])
    got = []
    with pytest.raises(errors.ReplicaUnavailable):
        async for event in ServeBackend(handle, retry_budget_s=5).chat("s", "hi", params, None):
            got.append(event)
    assert got == [TurnDelta("a")] and len(handle.calls) == 1  # never re-sent after output


async def test_closing_the_chat_stream_cancels_the_replica_generator():
    handle = FakeHandle([[TurnDelta("a"), TurnDelta("b"), FINISHED]])
    stream = ServeBackend(handle).chat("s", "hi", GenerationParams(), None)
    assert await stream.__anext__() == TurnDelta("a")
    await stream.aclose()
    assert handle.streams[0].cancelled


async def test_progress_keeps_a_slow_turn_alive_and_is_not_passed_on():
    """A long ingest: each wait is shorter than the call timeout only because TurnProgress events arrive, and they
    never reach the client; a turn that only ever says it is alive is still re-sendable (it produced nothing)."""
    from sinkserve.protocol import TurnProgress

    class SlowStream(FakeStream):
        async def __anext__(self):
            await asyncio.sleep(0.06)  # longer than the backend's call timeout below, in total
            return await super().__anext__()

    stream = SlowStream([TurnProgress(1.0), TurnProgress(2.0), TurnProgress(3.0), TurnDelta("late"), FINISHED])
    stream.cancel = lambda: None

    class Handle:
        class chat:
            @staticmethod
            def remote(**kwargs):
                return stream

        def options(self, stream=False):
            return self

    events = [e async for e in ServeBackend(Handle(), call_timeout_s=0.1).chat("s", "hi", GenerationParams(), None)]
    assert events == [TurnDelta("late"), FINISHED]
