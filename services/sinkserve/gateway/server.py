"""The gRPC gateway (grpc.aio): the SinkServe RPC handlers, health, and the server that wires them.

Handlers only: authentication and the mapping of errors to statuses are the interceptors' (``interceptors.py``),
wire conversion is ``convert.py``'s, the gateway's limits are ``limits.py``'s, and calls to the replicas go through
``backend.py``. A handler reads its tenant with ``current_tenant()`` and raises ``sinkserve.errors`` when it refuses.

It never imports torch: it needs Redis (tenants, sessions, quotas) and a Ray Serve DeploymentHandle
(which runs ``sinkserve.routing``'s request router in this process).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sinkserve.config import Settings
from sinkserve.gateway import convert
from sinkserve.gateway.core import MAX_TURN_S, GatewayCore, TurnLease  # noqa: F401 - re-exported
from sinkserve.gateway.interceptors import AuthInterceptor, ErrorInterceptor, current_tenant
from sinkserve.store import Store, TurnRecord
from sinkserve.v1 import sinkserve_pb2 as pb
from sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc

logger = logging.getLogger("sinkserve.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SinkServe"].full_name


def _cancelled(context: grpc.aio.ServicerContext):
    return context.cancelled


class SinkServeService(pb_grpc.SinkServeServicer):
    """The RPCs: wire conversion around ``GatewayCore``, which holds the logic every front end shares."""

    def __init__(self, settings: Settings, store: Store, backend: Any, core: GatewayCore | None = None):
        self.core = core or GatewayCore(settings, store, backend)
        self.settings = settings
        self.limits = self.core.limits
        self.store = store
        self.backend = backend

    # ------------------------------------------------------------------ RPCs
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        record, view = await self.core.create_session(
            current_tenant(), request.system_prompt, convert.settings_to_fields(request.default_settings),
            request.labels, cancelled=_cancelled(context),
        )
        return pb.CreateSessionResponse(session=convert.session_to_pb(record, view))

    async def SendMessage(self, request: pb.SendMessageRequest, context) -> AsyncIterator[pb.SendMessageEvent]:
        async for event in self.core.send_message(
            current_tenant(), request.session_id, request.text, convert.settings_to_fields(request.settings),
            request.request_id, time_remaining_s=context.time_remaining(), cancelled=_cancelled(context),
        ):
            messages = convert.replay_to_pb(event) if isinstance(event, TurnRecord) else convert.turn_event_to_pb(event)
            for message in messages:
                yield message

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        record, view, busy, last_turn = await self.core.session_info(current_tenant(), request.session_id)
        return convert.session_to_pb(record, view, busy, last_turn)

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        after = convert.decode_cursor(request.page_token)
        records, next_member = await self.core.list_sessions(current_tenant(), request.page_size, after)
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_pb(r) for r in records],
            next_page_token=convert.encode_cursor(next_member),
        )

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        await self.core.delete_session(current_tenant(), request.session_id)
        return pb.DeleteSessionResponse()


class GatewayHealth:
    """grpc.health.v1: SERVING while Redis answers; checked every few seconds."""

    def __init__(self, store: Store, period_s: float = 2.0):
        self.servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.store = store
        self.period_s = period_s
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def _set(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            result = self.servicer.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.store.ping()
                await self._set(health_pb2.HealthCheckResponse.SERVING)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
            try:
                async with asyncio.timeout(self.period_s):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def start(self) -> None:
        # Not SERVING until Redis has answered once (grpc's servicer starts "" as SERVING).
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self, timeout_s: float = 5.0) -> None:
        """End the watch and wait for it, before the store closes under it. The event as well as the cancel: on
        Python 3.11 a Redis call can swallow a cancellation (redis-py's send uses asyncio.wait_for, gh-86296)."""
        if self._task:
            self._stopping.set()
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=timeout_s)
            self._task = None


class FrontEnd(Protocol):
    """Another protocol served by the gateway process on the same ``GatewayCore`` (``sinkserve.http``'s API):
    started after the gRPC server, stopped before it. The gateway never imports its front ends: its caller
    (the CLI, a test) passes them in."""

    async def start(self, core: GatewayCore) -> None: ...

    async def stop(self) -> None: ...


class Gateway:
    """A running gateway: the grpc.aio server plus its Redis clients. Create and stop it on one event loop."""

    def __init__(self, settings: Settings, backend: Any, frontends: Sequence[FrontEnd] = ()):
        self.settings = settings
        self.backend = backend
        self.store = Store.from_config(settings.redis, settings.limits)
        self.core = GatewayCore(settings, self.store, backend)
        self.frontends = list(frontends)
        self.server: grpc.aio.Server | None = None
        self.health: GatewayHealth | None = None
        self.port: int | None = None

    async def start(self) -> int:
        cfg = self.settings.gateway
        # Generous transport limit: oversized *messages* are refused by the size check with a clear error.
        max_bytes = max(4 * 1024 * 1024, 4 * cfg.max_message_bytes)
        self.server = grpc.aio.server(
            # Outermost first: every error (authentication's included) becomes a status in ErrorInterceptor.
            interceptors=[ErrorInterceptor(), AuthInterceptor(self.store.tenants)],
            options=[("grpc.max_receive_message_length", max_bytes), ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_SinkServeServicer_to_server(SinkServeService(self.settings, self.store, self.backend, self.core), self.server)
        self.health = GatewayHealth(self.store)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert_file and cfg.tls_key_file:
            with open(cfg.tls_key_file, "rb") as key, open(cfg.tls_cert_file, "rb") as cert:
                creds = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"could not bind the gateway to {address}")
        await self.health.start()
        await self.server.start()
        logger.info("gateway listening on %s:%d", cfg.host, self.port)
        for frontend in self.frontends:  # other protocols on the same logic (the HTTP API)
            await frontend.start(self.core)
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        for frontend in self.frontends:
            try:
                await frontend.stop()
            except Exception:  # noqa: BLE001 - stop the rest all the same
                logger.warning("could not stop %r", frontend, exc_info=True)
        if self.health:
            await self.health.stop()
        if self.server:
            await self.server.stop(grace_s)
        await self.store.close()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()
