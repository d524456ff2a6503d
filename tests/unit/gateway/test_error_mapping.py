"""Error mapping and authentication as interceptors, through a real grpc.aio server and a real channel.

The subject is the interceptor: the servicer is a tiny generic handler that raises whatever the test asks for (by
request payload), for a unary and a streaming method, so what a client sees is decided by the interceptors alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis import exceptions as redis_exc

from sinkserve import errors
from sinkserve.config import RedisConfig
from sinkserve.gateway.interceptors import (
    REQUEST_ID_KEY,
    RETRY_AFTER_KEY,
    AuthInterceptor,
    ErrorInterceptor,
    answer_for,
    bearer_key,
    current_tenant,
)
from sinkserve.store import Store
from sinkserve.store.redis_server import free_port

SERVICE = "test.Probe"


def all_error_classes() -> list[type[errors.SinkServeError]]:
    found, todo = [], [errors.SinkServeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted({c for c in found if c.__module__ == "sinkserve.errors"}, key=lambda c: c.__name__)


class RayLikeWrapper(Exception):
    """What Ray does to a remote exception: a wrapper whose text is the remote traceback, the error as `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__(
            "ray::SinkServeReplica.chat() (pid=4242, ip=10.9.8.7, actor_id=8a1f00c0ffee)\n"
            "Traceback (most recent call last):\n  File \"/srv/replica/turns.py\", line 120, in run\n"
            f"{type(cause).__name__}: {cause}"
        )
        self.cause = cause


def real_ray_wrapper(cause: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    traceback = "Traceback (most recent call last):\n  File \"/srv/replica/turns.py\", line 120, in run\n"
    return RayTaskError("chat", traceback, cause, pid=4242, ip="10.9.8.7",
                        actor_id="8a1f00c0ffee").as_instanceof_cause()


# Internals that must never reach a client.
LEAKS = re.compile(r"Traceback|File \"|pid|actor_id|8a1f00c0ffee|10\.9\.8\.7|\d+\.\d+\.\d+\.\d+|:\d{2,5}\b|"
                   r"Error:|RuntimeError|ConnectionError|RayTaskError|ValueError", re.I)


class Probe:
    """The fake handler side: `raises[payload]` builds the exception that call raises."""

    def __init__(self) -> None:
        self.raises: dict[bytes, Callable[[], BaseException]] = {}
        self.calls = 0
        self.tenants: list[str] = []

    def _maybe_raise(self, request: bytes) -> None:
        self.calls += 1
        try:
            self.tenants.append(current_tenant().name)
        except errors.Unauthenticated:
            pass
        if request in self.raises:
            raise self.raises[request]()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler aborted")
        self._maybe_raise(request)
        return b"ok:" + request

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext):
        yield b"first"
        self._maybe_raise(request)
        yield b"second"

    async def stream_early(self, request: bytes, context: grpc.aio.ServicerContext):
        self._maybe_raise(request)
        yield b"only"

    async def writer(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """A streaming handler in the reader/writer style (a coroutine, not a generator)."""
        await context.write(b"written")
        self._maybe_raise(request)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "StreamEarly": grpc.unary_stream_rpc_method_handler(self.stream_early),
            "Writer": grpc.unary_stream_rpc_method_handler(self.writer),
        })


class Served:
    def __init__(self, server: grpc.aio.Server, channel: grpc.aio.Channel, probe: Probe):
        self.server, self.channel, self.probe = server, channel, probe

    async def unary(self, payload: bytes, metadata: Any = ()) -> bytes:
        return await self.channel.unary_unary(f"/{SERVICE}/Unary")(payload, metadata=metadata, timeout=10)

    async def stream(self, payload: bytes, method: str = "Stream", metadata: Any = ()) -> tuple[list[bytes], Any]:
        """The messages received before the call ended, and the RpcError it ended with (or None)."""
        call = self.channel.unary_stream(f"/{SERVICE}/{method}")(payload, metadata=metadata, timeout=10)
        got = []
        try:
            async for message in call:
                got.append(message)
        except grpc.RpcError as err:
            return got, err
        return got, None


async def serve(interceptors: list, probe: Probe, extra: Callable[[grpc.aio.Server], None] | None = None) -> Served:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((probe.generic_handler(),))
    if extra:
        extra(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return Served(server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), probe)


@pytest.fixture
async def served():
    made = await serve([ErrorInterceptor()], Probe())
    yield made
    await made.channel.close()
    await made.server.stop(0)


def trailers(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


async def call_error(served: Served, make: Callable[[], BaseException]) -> grpc.aio.AioRpcError:
    served.probe.raises[b"x"] = make
    with pytest.raises(grpc.RpcError) as caught:
        await served.unary(b"x")
    return caught.value


# ---------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
async def test_each_error_class_gets_its_status_and_message(served, cls):
    err = await call_error(served, lambda: cls("a client-safe reason"))
    if cls is errors.NotOwner:  # internal: it only escapes when re-sending never settled
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in err.details()
    else:
        assert err.code() == grpc.StatusCode[cls.status.name]
        assert err.details() == "a client-safe reason"
    assert re.fullmatch(r"[0-9a-f]{16}", trailers(err)[REQUEST_ID_KEY])
    assert RETRY_AFTER_KEY not in trailers(err)


def test_every_status_is_a_grpc_status():
    for status in errors.Status:
        assert grpc.StatusCode[status.name].name == status.name


@pytest.mark.parametrize("retry_after_s, millis", [(1.5, "1500"), (0.0, "0"), (42.0, "42000")])
async def test_retry_after_travels_as_trailing_metadata(served, retry_after_s, millis):
    err = await call_error(served, lambda: errors.NoFreeSlot("every slot is busy", retry_after_s=retry_after_s))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers(err)[RETRY_AFTER_KEY] == millis
    assert REQUEST_ID_KEY in trailers(err)


@pytest.mark.parametrize("make", [
    lambda: redis_exc.ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused."),
    lambda: redis_exc.TimeoutError("Timeout reading from redis-0.redis.svc:6379"),
    lambda: redis_exc.ResponseError("NOSCRIPT No matching script at 127.0.0.1:6390"),
], ids=["connection", "timeout", "other"])
async def test_redis_failures_are_unavailable_without_the_address(served, make):
    err = await call_error(served, make)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "session store unavailable"
    assert not LEAKS.search(err.details())


async def test_anything_else_is_internal_with_no_internals_and_the_details_logged(served, caplog):
    text = ("Traceback (most recent call last):\n  File \"/srv/sinkserve/replica/loop.py\", line 88, in step\n"
            "RuntimeError: engine thread pid=31337 actor_id=8a1f00c0ffee lost 127.0.0.1:6379")
    with caplog.at_level(logging.INFO, logger="sinkserve.gateway"):
        err = await call_error(served, lambda: RuntimeError(text))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"
    assert not LEAKS.search(err.details())
    request_id = trailers(err)[REQUEST_ID_KEY]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged, "the error is not logged under its request id"
    assert "pid=31337" in logged[0].getMessage() and logged[0].exc_info  # the operator gets the details


@pytest.mark.parametrize("wrap", [RayLikeWrapper, real_ray_wrapper], ids=["ray-like", "RayTaskError"])
async def test_a_wrapped_replica_error_is_unwrapped(served, wrap):
    err = await call_error(served, lambda: wrap(errors.SessionBusy("session s1 is still replying")))
    assert err.code() == grpc.StatusCode.ABORTED
    assert err.details() == "session s1 is still replying"
    assert not LEAKS.search(err.details())


@pytest.mark.parametrize("wrap", [RayLikeWrapper, real_ray_wrapper], ids=["ray-like", "RayTaskError"])
async def test_a_wrapped_unknown_error_is_internal(served, wrap):
    err = await call_error(served, lambda: wrap(ValueError("bad things at 10.0.0.1:8265")))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"


async def test_request_ids_differ_per_call(served):
    served.probe.raises[b"x"] = lambda: errors.SessionNotFound("session x not found")
    ids = set()
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as caught:
            await served.unary(b"x")
        ids.add(trailers(caught.value)[REQUEST_ID_KEY])
    assert len(ids) == 3


async def test_success_passes_through_untouched(served):
    assert await served.unary(b"fine") == b"ok:fine"
    got, err = await served.stream(b"fine")
    assert (got, err) == ([b"first", b"second"], None)


async def test_a_handler_that_aborts_keeps_its_own_status(served):
    with pytest.raises(grpc.RpcError) as caught:
        await served.unary(b"abort")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "the handler aborted"


@pytest.mark.parametrize("method, before", [("Stream", [b"first"]), ("StreamEarly", []), ("Writer", [b"written"])])
async def test_streaming_handlers_are_mapped_too(served, method, before):
    served.probe.raises[b"x"] = lambda: errors.DeadlineExceeded("the turn ran past its deadline", retry_after_s=2)
    got, err = await served.stream(b"x", method)
    assert got == before  # what was sent before the failure arrives, then the status
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.details() == "the turn ran past its deadline"
    assert trailers(err)[RETRY_AFTER_KEY] == "2000" and REQUEST_ID_KEY in trailers(err)

    served.probe.raises[b"y"] = lambda: redis_exc.ConnectionError("Error 111 connecting to 10.1.2.3:6379.")
    got, err = await served.stream(b"y", method)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "session store unavailable"


async def test_an_unknown_method_stays_unimplemented(served):
    with pytest.raises(grpc.RpcError) as caught:
        await served.channel.unary_unary(f"/{SERVICE}/Nope")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_answer_for_is_the_table():
    assert answer_for(errors.TenantSessionLimit("limit of 2")).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answer_for(errors.Fenced("moved")).code == grpc.StatusCode.UNAVAILABLE
    assert answer_for(KeyError("x")) == (grpc.StatusCode.INTERNAL, "internal error", None)
    # An error raised from another keeps its own status.
    try:
        try:
            raise redis_exc.ConnectionError("down")
        except redis_exc.ConnectionError as cause:
            raise errors.StoreUnavailable("the session store is unavailable") from cause
    except errors.StoreUnavailable as err:
        assert answer_for(err) == (grpc.StatusCode.UNAVAILABLE, "the session store is unavailable", None)


# ---------------------------------------------------------------------------------------------- auth
@pytest.fixture
async def authed(store):
    probe = Probe()

    def add_health(server: grpc.aio.Server) -> None:
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    made = await serve([ErrorInterceptor(), AuthInterceptor(store.tenants)], probe, add_health)
    _, key = await store.tenants.create("acme")
    made.key = key
    yield made
    await made.channel.close()
    await made.server.stop(0)


BAD_METADATA = [
    (),
    (("authorization", "Bearer sk-ss-not-a-key"),),
    (("authorization", "Basic abc"),),
    (("authorization", "Bearer "),),
    (("authorization", "sk-ss-no-scheme"),),
]


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=["none", "unknown", "basic", "empty", "no-scheme"])
async def test_bad_keys_are_refused_before_the_handler_runs(authed, metadata):
    with pytest.raises(grpc.RpcError) as caught:
        await authed.unary(b"hi", metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details()
    assert REQUEST_ID_KEY in trailers(caught.value)
    got, err = await authed.stream(b"hi", metadata=metadata)
    assert got == [] and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert authed.probe.calls == 0


async def test_a_good_key_hands_the_tenant_to_the_handler(authed):
    metadata = (("authorization", f"Bearer {authed.key}"),)
    assert await authed.unary(b"hi", metadata) == b"ok:hi"
    got, err = await authed.stream(b"hi", metadata=metadata)
    assert err is None and got == [b"first", b"second"]
    got, err = await authed.stream(b"hi", "Writer", metadata=metadata)
    assert err is None and got == [b"written"]
    assert authed.probe.tenants == ["acme", "acme", "acme"]
    # Case and spacing of the scheme do not matter.
    assert await authed.unary(b"again", (("authorization", f"bearer   {authed.key} "),)) == b"ok:again"


async def test_tenants_do_not_leak_between_concurrent_calls(store, authed):
    _, other = await store.tenants.create("globex")
    keys = [authed.key, other] * 10
    await asyncio.gather(*(authed.unary(b"hi", (("authorization", f"Bearer {k}"),)) for k in keys))
    assert sorted(authed.probe.tenants) == sorted(["acme", "globex"] * 10)


async def test_errors_after_authentication_are_still_mapped(authed):
    authed.probe.raises[b"x"] = lambda: errors.PermissionDenied("session s belongs to another tenant")
    with pytest.raises(grpc.RpcError) as caught:
        await authed.unary(b"x", (("authorization", f"Bearer {authed.key}"),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_health_needs_no_key(authed):
    reply = await health_pb2_grpc.HealthStub(authed.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_store_outage_during_authentication_is_unavailable():
    dead = Store.from_config(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1))
    made = await serve([ErrorInterceptor(), AuthInterceptor(dead.tenants)], Probe())
    try:
        with pytest.raises(grpc.RpcError) as caught:
            await made.unary(b"hi", (("authorization", "Bearer sk-ss-whatever"),))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "session store unavailable"
        assert made.probe.calls == 0
    finally:
        await made.channel.close()
        await made.server.stop(0)
        await dead.close()


def _metadata_cases() -> Iterator[tuple[Any, str | None]]:
    yield (("authorization", "Bearer k1"),), "k1"
    yield (("Authorization", "BEARER k2"),), "k2"
    yield (("x-other", "1"), ("authorization", b"Bearer k3")), "k3"
    yield (("authorization", "Bearer"),), None
    yield (), None
    yield None, None


@pytest.mark.parametrize("metadata, key", list(_metadata_cases()))
def test_bearer_key(metadata, key):
    assert bearer_key(metadata) == key
