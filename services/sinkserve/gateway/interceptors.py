"""grpc.aio server interceptors: error mapping and authentication, wired once in ``Gateway.start``.

``ErrorInterceptor`` is the one place where an exception becomes a gRPC status:

- a ``SinkServeError`` (raised here, or unwrapped from Ray's wrappers) -> ``grpc.StatusCode[err.status.name]``
  with ``err.message``, plus ``retry-after-ms`` trailing metadata when the error carries ``retry_after_s``;
- ``NotOwner`` that escaped the backend's retries -> UNAVAILABLE;
- redis-py errors (connection, timeout, any other) -> UNAVAILABLE "session store unavailable";
- anything else -> INTERNAL "internal error".

Every error answer carries a ``request-id`` trailer; the server log has the details under that id. Messages never
carry internals (tracebacks, actor ids, pids, addresses, exception class names).

``AuthInterceptor`` reads ``authorization: Bearer <api key>`` (exactly one such header), authenticates it against
the store's tenants and refuses with UNAUTHENTICATED before the handler runs; then it takes the call from the
tenant's request-rate bucket (RESOURCE_EXHAUSTED with ``retry-after-ms`` when it is empty). The handler reads the
tenant with ``current_tenant()``. The health and reflection services need no key and are not rate-limited.

Both wrap the method handler's behaviour (a new ``grpc.RpcMethodHandler`` of the same kind), so they work for
unary and streaming responses alike and see the handler's exceptions, not just its lookup.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, NamedTuple

import grpc
from redis import exceptions as redis_exc

from sinkserve.errors import InvalidArgument, NotOwner, ResourceExhausted, Unauthenticated, find_error
from sinkserve.store import Tenant, Tenants

logger = logging.getLogger("sinkserve.gateway")

REQUEST_ID_KEY = "request-id"
RETRY_AFTER_KEY = "retry-after-ms"
# Services anyone may call: load balancers probe health, tools list services without a key.
EXEMPT_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

_tenant: contextvars.ContextVar[Tenant] = contextvars.ContextVar("sinkserve_tenant")
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("sinkserve_request_id", default="")


def current_tenant() -> Tenant:
    """The authenticated tenant of the RPC being handled (set by AuthInterceptor)."""
    try:
        return _tenant.get()
    except LookupError:
        raise Unauthenticated("no authenticated tenant") from None


def current_request_id() -> str:
    return _request_id.get()


def service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").rpartition("/")[0]


# ---------------------------------------------------------------------------------------------- wrapping
Behaviour = Callable[..., Any]


class Wrappers(NamedTuple):
    """How an interceptor surrounds one method's behaviour: `call` for a coroutine (a unary response, or a streaming
    handler that writes with context.write), `stream` for an async generator. Each takes (behaviour, method)."""

    call: Callable[[Callable[..., Awaitable[Any]], str], Callable[..., Awaitable[Any]]]
    stream: Callable[[Behaviour, str], Behaviour]


def _wrap_behaviour(behaviour: Behaviour, method: str, wrappers: Wrappers) -> Behaviour:
    if inspect.isasyncgenfunction(behaviour):
        return wrappers.stream(behaviour, method)

    async def as_coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return wrappers.call(as_coroutine, method)


def wrap_handler(handler: grpc.RpcMethodHandler, method: str, wrappers: Wrappers) -> grpc.RpcMethodHandler:
    """The same method handler (kind, (de)serializers) with its behaviour surrounded."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    for kind, make in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(_wrap_behaviour(behaviour, method, wrappers), **kwargs)
    return handler


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Surrounds the behaviour of every method outside `exempt` with `self.wrappers`."""

    exempt: frozenset[str] = EXEMPT_SERVICES
    wrappers: Wrappers

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method) in self.exempt:
            return handler
        return wrap_handler(handler, method, self.wrappers)


# ---------------------------------------------------------------------------------------------- errors
class Answer(NamedTuple):
    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None


def answer_for(exc: BaseException) -> Answer:
    """The status, client-safe message and retry hint for an exception: the whole error table of the gateway."""
    found = find_error(exc)
    if found is not None:
        if isinstance(found, NotOwner):  # the backend's retries ran out while the session moved
            return Answer(grpc.StatusCode.UNAVAILABLE, "the session is moving to another replica; retry shortly",
                          found.retry_after_s)
        return Answer(grpc.StatusCode[found.status.name], str(found.message), found.retry_after_s)
    if isinstance(exc, redis_exc.RedisError):
        return Answer(grpc.StatusCode.UNAVAILABLE, "session store unavailable")
    return Answer(grpc.StatusCode.INTERNAL, "internal error")


def _trailers(answer: Answer, request_id: str) -> tuple[tuple[str, str], ...]:
    trailers = [(REQUEST_ID_KEY, request_id)]
    if answer.retry_after_s is not None:
        trailers.append((RETRY_AFTER_KEY, str(max(0, int(answer.retry_after_s * 1000)))))
    return tuple(trailers)


class Undecodable(NamedTuple):
    """A request whose bytes did not decode (corrupt protobuf, invalid UTF-8 in a string field): handed to the
    error interceptor instead of failing inside grpc, which would answer UNKNOWN with a Python class name."""

    error: str


BAD_REQUEST = "the request could not be decoded (a corrupt message, or invalid UTF-8 in a string field)"


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, UnicodeDecodeError...
            return Undecodable(_describe(exc))

    return deserialize


class ErrorInterceptor(_WrappingInterceptor):
    """Every exception a handler (or an inner interceptor) raises becomes one status, here and nowhere else; a
    request that does not decode is INVALID_ARGUMENT before any other interceptor or handler sees it."""

    def __init__(self, log: logging.Logger = logger):
        self.log = log
        self.wrappers = Wrappers(self._call, self._stream)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await super().intercept_service(continuation, handler_call_details)
        if handler is None or handler.request_deserializer is None or \
                service_of(handler_call_details.method) in self.exempt:
            return handler
        return handler._replace(request_deserializer=tolerant(handler.request_deserializer))

    def _call(self, behaviour, method):
        async def call(request, context):
            _request_id.set(new_request_id())
            try:
                if isinstance(request, Undecodable):
                    raise InvalidArgument(BAD_REQUEST)
                return await behaviour(request, context)
            except grpc.aio.AbortError:  # the handler aborted the call itself
                raise
            except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
                await self.abort(context, exc, method)

        return call

    def _stream(self, behaviour, method):
        async def stream(request, context):
            _request_id.set(new_request_id())
            try:
                if isinstance(request, Undecodable):
                    raise InvalidArgument(BAD_REQUEST)
                async with aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self.abort(context, exc, method)

        return stream

    async def abort(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str = "") -> None:
        answer = answer_for(exc)
        request_id = current_request_id() or new_request_id()
        if answer.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
            self.log.warning("request %s %s: %s (%s)", request_id, method, answer.code.name, _describe(exc),
                             exc_info=exc if answer.code is grpc.StatusCode.INTERNAL else None)
        else:
            self.log.info("request %s %s: %s %s", request_id, method, answer.code.name, answer.message)
        await context.abort(answer.code, answer.message, trailing_metadata=_trailers(answer, request_id))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------------------- auth
class DuplicateAuthorization(Unauthenticated):
    """More than one ``authorization`` header: refused rather than letting one of them win."""


def bearer_key(metadata: Any) -> str | None:
    """The API key of `authorization: Bearer <key>`, or None; DuplicateAuthorization for two headers or more."""
    headers = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(headers) > 1:
        raise DuplicateAuthorization("more than one 'authorization' header: send exactly one")
    header = headers[0] if headers else ""
    header = header.decode() if isinstance(header, bytes) else header
    scheme, _, api_key = header.strip().partition(" ")
    api_key = api_key.strip()
    if scheme.lower() != "bearer" or not api_key:
        return None
    return api_key


class AuthInterceptor(_WrappingInterceptor):
    """Authenticates every call outside the exempt services before its handler runs."""

    def __init__(self, tenants: Tenants, exempt: frozenset[str] = EXEMPT_SERVICES):
        self.tenants = tenants
        self.exempt = exempt
        self.wrappers = Wrappers(self._call, self._stream)

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Tenant:
        api_key = bearer_key(context.invocation_metadata())
        if api_key is None:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        from sinkserve.gateway.core import authenticate

        return await authenticate(self.tenants, api_key)

    def _call(self, behaviour, method):
        async def call(request, context):
            token = _tenant.set(await self.authenticate(context))
            try:
                return await behaviour(request, context)
            finally:
                _tenant.reset(token)

        return call

    def _stream(self, behaviour, method):
        async def stream(request, context):
            # Each RPC runs in a task (and context) of its own: the tenant set here dies with it.
            _tenant.set(await self.authenticate(context))
            async with aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream
