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
import time
import uuid
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sinkserve.config import Settings
from sinkserve.errors import InvalidArgument, ResourceExhausted, SessionBusy, SinkServeError
from sinkserve.gateway import convert
from sinkserve.gateway.interceptors import AuthInterceptor, ErrorInterceptor, current_tenant
from sinkserve.gateway.limits import Limits
from sinkserve.protocol import GenerationParams
from sinkserve.store import SessionRecord, Store, Tenant, TurnRecord
from sinkserve.store.keys import session_not_found
from sinkserve.store.sessions import message_digest
from sinkserve.v1 import sinkserve_pb2 as pb
from sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc

logger = logging.getLogger("sinkserve.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SinkServe"].full_name
# Longest a turn may run when the client set no deadline.
MAX_TURN_S = 900.0


def _raise_if_cancelled(context: grpc.aio.ServicerContext) -> None:
    """Stop here if the client hung up. On Python 3.11 a Redis call can swallow the cancellation of the handler's
    task (redis-py's send uses asyncio.wait_for, CPython gh-86296): the request counts, not the exception."""
    task = asyncio.current_task()
    if context.cancelled() or (task is not None and task.cancelling()):
        raise asyncio.CancelledError


class TurnLease:
    """Keeps a turn's session lock and token reservation alive while the turn streams: renews both every third of
    the lease, from a task of its own. A gateway that dies stops renewing, so the lock lapses within one lease and
    the replica, which watches the lock, stops the orphaned turn. Renewal is compare-and-set: a lock that lapsed
    and was taken by another turn is never extended (the replica then stops this turn)."""

    def __init__(self, store: Store, session_id: str, tenant: str, turn_id: str, lease_s: float):
        self.store = store
        self.session_id = session_id
        self.tenant = tenant
        self.turn_id = turn_id
        self.lease_ms = max(1, int(lease_s * 1000))
        self.period_s = lease_s / 3
        self.lost = False  # the lock lapsed or went to another turn
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> "TurnLease":
        self._task = asyncio.get_running_loop().create_task(self._renew_until_stopped())
        return self

    async def _renew_until_stopped(self) -> None:
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self.period_s):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                if not self.lost and not await self.store.sessions.renew_turn_lock(
                        self.session_id, self.turn_id, self.lease_ms):
                    self.lost = True
                    logger.warning("the turn lock of %s lapsed before its turn %s ended", self.session_id,
                                   self.turn_id)
                await self.store.tenants.renew_tokens(self.tenant, self.turn_id, self.lease_ms)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - try again next period; the lease covers a few misses
                logger.warning("could not renew the turn lease of %s", self.session_id, exc_info=True)

    def stop(self) -> None:
        """End the renewals. The event as well as the cancel: on Python 3.11 a Redis call can swallow a
        cancellation (gh-86296), and the loop must end all the same."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()


class SinkServeService(pb_grpc.SinkServeServicer):
    def __init__(self, settings: Settings, store: Store, backend: Any):
        self.settings = settings
        self.limits = Limits(settings.gateway)
        self.store = store
        self.backend = backend

    async def _own_session(self, tenant: Tenant, session_id: str) -> SessionRecord:
        self.limits.check_session_id(session_id)
        record = await self.store.sessions.get_session(session_id)  # SessionNotFound when there is none
        if record.tenant != tenant.name:
            raise session_not_found(session_id)  # the same answer as for no session: existence is not revealed
        return record

    # ------------------------------------------------------------------ RPCs
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        tenant = current_tenant()
        self.limits.check_text(request.system_prompt, "system_prompt")
        defaults = self.limits.session_defaults(convert.settings_to_fields(request.default_settings))
        labels = self.limits.check_labels(request.labels)
        record = await self.store.sessions.create_session(
            tenant.name, max_sessions=tenant.max_sessions, system_prompt=request.system_prompt,
            defaults=defaults, labels=labels,
        )
        try:
            _raise_if_cancelled(context)
            view = await self.backend.create(session_id=record.session_id)
        except BaseException:
            # No replica took it: the session must not exist half-made.
            await asyncio.shield(self._forget(record))
            raise
        record = await self.store.sessions.get_session(record.session_id)
        return pb.CreateSessionResponse(session=convert.session_to_pb(record, view))

    async def _forget(self, record: SessionRecord) -> None:
        try:
            await self.store.sessions.delete_session(record.session_id, record.tenant)
        except Exception:  # noqa: BLE001 - the create's own failure is the answer
            logger.warning("could not delete the half-made session %s", record.session_id, exc_info=True)

    async def SendMessage(self, request: pb.SendMessageRequest, context) -> AsyncIterator[pb.SendMessageEvent]:
        tenant = current_tenant()
        self.limits.check_message(request.text)
        request_id = self.limits.check_request_id(request.request_id)
        record = await self._own_session(tenant, request.session_id)
        sid = record.session_id
        params = self.limits.turn_params(record.defaults, convert.settings_to_fields(request.settings))
        recorded = await self._recorded_turn(sid, request_id, request.text)
        if recorded is not None:  # a retry of a turn already recorded: its answer, not a second turn
            for message in convert.replay_to_pb(recorded):
                yield message
            return
        remaining = context.time_remaining()
        turn_s = min(remaining, MAX_TURN_S) if remaining is not None else MAX_TURN_S
        deadline_unix = time.time() + turn_s
        turn_id = uuid.uuid4().hex
        lease_s = self.settings.gateway.turn_lease_s
        if not await self.store.sessions.try_lock_turn(sid, turn_id, int(lease_s * 1000)):
            raise SessionBusy(f"session {sid} is still replying to a previous message")
        lease = TurnLease(self.store, sid, tenant.name, turn_id, lease_s).start()
        try:
            # Recorded between the look above and the lock (the first attempt ended meanwhile)?
            recorded = await self._recorded_turn(sid, request_id, request.text)
            if recorded is not None:
                for message in convert.replay_to_pb(recorded):
                    yield message
                return
            await self._reserve_tokens(tenant, record, request.text, params, turn_id, lease.lease_ms)
            _raise_if_cancelled(context)
            async for event in self.backend.chat(
                session_id=sid, text=request.text, params=params, deadline_unix=deadline_unix, turn_id=turn_id,
                request_id=request_id or None,
            ):
                for message in convert.turn_event_to_pb(event):
                    yield message
        finally:
            lease.stop()
            await asyncio.shield(self._end_turn(sid, tenant.name, turn_id))

    async def _recorded_turn(self, session_id: str, request_id: str, text: str) -> TurnRecord | None:
        if not request_id:
            return None
        recorded = await self.store.sessions.recorded_turn(session_id, request_id)
        if recorded is not None and recorded.message_digest and recorded.message_digest != message_digest(text):
            raise InvalidArgument(f"request_id {request_id!r} was first sent with another message")
        return recorded

    async def _reserve_tokens(self, tenant: Tenant, record: SessionRecord, text: str, params: GenerationParams,
                              turn_id: str, lease_ms: int) -> None:
        """Reserve the turn's worst case against the tenant's tokens per minute (released in _end_turn; the
        replica charges what the turn really used when it records it)."""
        limit = tenant.tokens_per_minute
        worst = self.limits.worst_case_tokens(text, params, record.system_prompt if record.turns == 0 else "")
        if worst > limit:
            raise ResourceExhausted(
                f"this turn may use up to {worst} tokens (message, template and max_tokens {params.max_tokens}), more "
                f"than tenant {tenant.name!r}'s {limit} tokens per minute: ask for fewer max_tokens"
            )
        reservation = await self.store.tenants.reserve_tokens(tenant.name, turn_id, worst, limit, lease_ms)
        if not reservation.granted:
            wait_s = self.store.tenants.seconds_to_next_window()
            raise ResourceExhausted(
                f"tenant {tenant.name!r} used {reservation.used} of its {limit} tokens this minute and turns in flight "
                f"hold {reservation.reserved} more; this turn may need {worst}; retry in {wait_s:.0f}s",
                retry_after_s=wait_s,
            )

    async def _end_turn(self, session_id: str, tenant: str, turn_id: str) -> None:
        try:
            await self.store.tenants.release_tokens(tenant, turn_id)
        except Exception:  # noqa: BLE001 - the reservation is a lease: it lapses
            logger.warning("could not release the token reservation of %s", session_id, exc_info=True)
        try:
            await self.store.sessions.unlock_turn(session_id, turn_id)
        except Exception:  # noqa: BLE001 - the lock is a lease: it lapses
            logger.warning("could not release the turn lock of %s", session_id, exc_info=True)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        record = await self._own_session(current_tenant(), request.session_id)
        busy = await self.store.sessions.is_busy(record.session_id)
        last_turn = await self.store.sessions.last_turn(record.session_id)
        view = None
        if record.owner:
            try:
                view = await self.backend.info(session_id=record.session_id)
            except SinkServeError as err:  # the registry still answers; the cache fields stay 0
                logger.info("info(%s) failed: %s", record.session_id, err.message)
        return convert.session_to_pb(record, view, busy, last_turn)

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        tenant = current_tenant()
        page_size = self.limits.page_size(request.page_size)
        after = convert.decode_cursor(request.page_token)
        ids, next_member = await self.store.sessions.list_sessions(tenant.name, page_size, after)
        records = await self.store.sessions.get_sessions(ids)
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_pb(r) for r in records if r is not None],
            next_page_token=convert.encode_cursor(next_member),
        )

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        tenant = current_tenant()
        record = await self._own_session(tenant, request.session_id)
        if record.owner:
            try:  # free the slot now; if this fails the owner notices at its next lease renewal
                await self.backend.delete(session_id=record.session_id)
            except SinkServeError as err:
                logger.info("delete(%s) on the replica failed: %s", record.session_id, err.message)
        await self.store.sessions.delete_session(record.session_id, tenant.name)
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


class Gateway:
    """A running gateway: the grpc.aio server plus its Redis clients. Create and stop it on one event loop."""

    def __init__(self, settings: Settings, backend: Any):
        self.settings = settings
        self.backend = backend
        self.store = Store.from_config(settings.redis, settings.limits)
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
        pb_grpc.add_SinkServeServicer_to_server(SinkServeService(self.settings, self.store, self.backend), self.server)
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
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.health:
            await self.health.stop()
        if self.server:
            await self.server.stop(grace_s)
        await self.store.close()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()
