"""The gRPC gateway (grpc.aio): authentication, tenancy, quotas, and streaming turns from the replicas.

It never imports torch: it needs Redis (tenants, sessions, quotas) and a Ray Serve DeploymentHandle
(which runs ``sinkserve.routing``'s request router in this process).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis import exceptions as redis_exc

from sinkserve.config import GatewayConfig, Settings
from sinkserve.errors import SessionNotFound, TenantSessionLimit
from sinkserve.replica.errors import ReplicaError
from sinkserve.store import SessionRecord, Store, Tenant
from sinkserve.v1 import sinkserve_pb2 as pb
from sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc

logger = logging.getLogger("sinkserve.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SinkServe"].full_name
FINISH_REASONS = {
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "aborted": pb.FINISH_REASON_ABORTED,
}
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Longest a turn may hold its session's lock when the client set no deadline.
MAX_TURN_S = 900.0


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def settings_to_dict(settings: pb.GenerationSettings) -> dict[str, Any]:
    """The fields the client set (proto3 optional presence), as SamplingParams keyword arguments."""
    out: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if settings.HasField(name):
            out[name] = getattr(settings, name)
    if settings.stop:
        out["stop"] = list(settings.stop)
    return out


def dict_to_settings(values: dict[str, Any]) -> pb.GenerationSettings:
    return pb.GenerationSettings(**values)


def validate_settings(values: dict[str, Any], cfg: GatewayConfig) -> None:
    def bad(message: str) -> RequestError:
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)

    if "max_tokens" in values and not 1 <= values["max_tokens"] <= cfg.max_new_tokens:
        raise bad(f"max_tokens must be between 1 and {cfg.max_new_tokens}")
    if "temperature" in values and not (values["temperature"] >= 0 and math.isfinite(values["temperature"])):
        raise bad("temperature must be a finite number >= 0")
    if "top_p" in values and not 0 < values["top_p"] <= 1:
        raise bad("top_p must be in (0, 1]")
    if "repetition_penalty" in values and not (
        values["repetition_penalty"] > 0 and math.isfinite(values["repetition_penalty"])
    ):
        raise bad("repetition_penalty must be a finite number > 0")
    if "seed" in values and values["seed"] >= 2**63:
        raise bad("seed must be < 2^63")
    stops = values.get("stop", [])
    if any(not s for s in stops):
        raise bad("stop strings must be non-empty")
    if len(stops) > 16 or sum(len(s.encode()) for s in stops) > 1024:
        raise bad("at most 16 stop strings of 1 KiB in all")


def _encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode() if member else ""


def _decode_cursor(token: str) -> str:
    if not token:
        return ""
    try:
        member = base64.urlsafe_b64decode(token.encode()).decode()
    except Exception:  # noqa: BLE001
        member = ""
    if "|" not in member:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
    return member


class SinkServeGateway(pb_grpc.SinkServeServicer):
    def __init__(self, settings: Settings, store: Store, backend: Any):
        self.settings = settings
        self.cfg = settings.gateway
        self.store = store
        self.backend = backend

    # ------------------------------------------------------------------ common
    async def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, api_key = header.partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <api key>' metadata")
        tenant = await self.store.tenants.authenticate(api_key.strip())
        if tenant is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        return tenant

    async def _own_session(self, tenant: Tenant, session_id: str) -> SessionRecord:
        if not session_id:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        if len(session_id) > 128:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is too long")
        try:
            record = await self.store.sessions.get_session(session_id)
        except SessionNotFound:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"session {session_id} not found") from None
        if record.tenant != tenant.name:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, f"session {session_id} belongs to another tenant")
        return record

    def _check_text(self, text: str, what: str) -> None:
        size = len(text.encode())
        if size > self.cfg.max_message_bytes:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} is {size} bytes; the limit is {self.cfg.max_message_bytes}",
            )

    def _session_message(self, record: SessionRecord, info: dict | None, busy: bool) -> pb.Session:
        info = info or {}
        return pb.Session(
            session_id=record.session_id,
            turns=record.turns,
            tokens_seen=max(record.tokens_seen, int(info.get("tokens_seen", 0))),
            cache_entries=int(info.get("cache_entries", 0)),
            cache_capacity=int(info.get("cache_capacity", 0)),
            owner_replica=record.owner,
            created_unix_ms=record.created_ms,
            busy=busy or bool(info.get("busy", False)),
            default_settings=dict_to_settings(record.defaults),
            labels=record.labels,
            system_prompt=record.system_prompt,
        )

    async def _abort(self, context: grpc.aio.ServicerContext, err: BaseException) -> None:
        if isinstance(err, RequestError):
            await context.abort(err.code, err.message)
        if isinstance(err, ReplicaError):
            code = getattr(grpc.StatusCode, err.status, None)
            if getattr(err, "retry_after_s", None) is not None:
                context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_s * 1000))),))
            if code is None:  # NOT_OWNER after every retry: the placement did not settle
                code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, err.message)
        if isinstance(err, (redis_exc.ConnectionError, redis_exc.TimeoutError, ConnectionError, OSError)):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {err}")
        if isinstance(err, redis_exc.RedisError):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store error: {err}")
        logger.exception("unexpected error", exc_info=err)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")

    # ------------------------------------------------------------------ RPCs
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        try:
            tenant = await self._tenant(context)
            self._check_text(request.system_prompt, "system_prompt")
            defaults = settings_to_dict(request.default_settings)
            validate_settings(defaults, self.cfg)
            if len(request.labels) > 32 or any(len(k) + len(v) > 256 for k, v in request.labels.items()):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "at most 32 labels of 256 bytes each")
            try:
                record = await self.store.sessions.create_session(
                    tenant.name,
                    max_sessions=tenant.max_sessions,
                    system_prompt=request.system_prompt,
                    defaults=defaults,
                    labels=dict(request.labels),
                )
            except TenantSessionLimit as err:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
            try:
                info = await self.backend.create(session_id=record.session_id)
            except BaseException:
                # No replica took it: the session must not exist half-made.
                await asyncio.shield(self.store.sessions.delete_session(record.session_id, tenant.name))
                raise
            record = await self.store.sessions.get_session(record.session_id)
            return pb.CreateSessionResponse(session=self._session_message(record, info, busy=False))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            await self._abort(context, err)

    async def SendMessage(self, request: pb.SendMessageRequest, context) -> AsyncIterator[pb.SendMessageEvent]:
        turn_id = uuid.uuid4().hex
        locked_session = None
        try:
            tenant = await self._tenant(context)
            if not request.text.strip():
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
            self._check_text(request.text, "text")
            record = await self._own_session(tenant, request.session_id)
            params = {**record.defaults, **settings_to_dict(request.settings)}
            validate_settings(params, self.cfg)
            params.setdefault("max_tokens", min(256, self.cfg.max_new_tokens))
            used = await self.store.tenants.tokens_used(tenant.name)
            if used >= tenant.tokens_per_minute:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"tenant {tenant.name!r} used {used} of its {tenant.tokens_per_minute} tokens this minute; "
                    f"retry in {self.store.tenants.seconds_to_next_window():.0f}s",
                )
            remaining = context.time_remaining()
            turn_s = min(remaining, MAX_TURN_S) if remaining is not None else MAX_TURN_S
            deadline_unix = time.time() + turn_s
            if not await self.store.sessions.try_lock_turn(record.session_id, turn_id, int((turn_s + 5) * 1000)):
                raise RequestError(
                    grpc.StatusCode.ABORTED, f"session {record.session_id} is still replying to a previous message"
                )
            locked_session = record.session_id
            async for event in self.backend.chat(
                session_id=record.session_id, text=request.text, params=params, deadline_unix=deadline_unix
            ):
                if "delta" in event:
                    yield pb.SendMessageEvent(delta=pb.TextDelta(text=event["delta"]))
                    continue
                final = event["final"]
                if final.get("text"):
                    yield pb.SendMessageEvent(delta=pb.TextDelta(text=final["text"]))
                yield pb.SendMessageEvent(
                    finished=pb.TurnFinished(
                        finish_reason=FINISH_REASONS.get(final["finish_reason"], pb.FINISH_REASON_UNSPECIFIED),
                        usage=pb.TokenUsage(
                            prompt_tokens=final["prompt_tokens"],
                            completion_tokens=final["completion_tokens"],
                            total_tokens=final["prompt_tokens"] + final["completion_tokens"],
                        ),
                        turn=final["turn"],
                        replica=final["replica"],
                        cache_entries=final["cache_entries"] or 0,
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            await self._abort(context, err)
        finally:
            if locked_session is not None:
                await asyncio.shield(self._unlock(locked_session, turn_id))

    async def _unlock(self, session_id: str, turn_id: str) -> None:
        try:
            await self.store.sessions.unlock_turn(session_id, turn_id)
        except Exception:  # noqa: BLE001 - the lock has a TTL
            logger.warning("could not release the turn lock of %s", session_id, exc_info=True)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        try:
            tenant = await self._tenant(context)
            record = await self._own_session(tenant, request.session_id)
            busy = await self.store.sessions.is_busy(record.session_id)
            info = None
            if record.owner:
                try:
                    info = await self.backend.info(session_id=record.session_id)
                except ReplicaError as err:  # the registry still answers; the cache fields stay 0
                    logger.info("info(%s) failed: %s", record.session_id, err)
            return self._session_message(record, info, busy)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            await self._abort(context, err)

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        try:
            tenant = await self._tenant(context)
            page_size = request.page_size or DEFAULT_PAGE_SIZE
            if page_size > MAX_PAGE_SIZE:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"page_size is at most {MAX_PAGE_SIZE}")
            after = _decode_cursor(request.page_token)
            ids, next_member = await self.store.sessions.list_sessions(tenant.name, page_size, after)
            records = await self.store.sessions.get_sessions(ids)
            sessions = [self._session_message(r, None, False) for r in records if r is not None]
            return pb.ListSessionsResponse(sessions=sessions, next_page_token=_encode_cursor(next_member))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            await self._abort(context, err)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        try:
            tenant = await self._tenant(context)
            record = await self._own_session(tenant, request.session_id)
            if record.owner:
                try:  # free the slot now; if this fails the owner notices at its next lease renewal
                    await self.backend.delete(session_id=record.session_id)
                except ReplicaError as err:
                    logger.info("delete(%s) on the replica failed: %s", record.session_id, err)
            await self.store.sessions.delete_session(record.session_id, tenant.name)
            return pb.DeleteSessionResponse()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            await self._abort(context, err)


class GatewayHealth:
    """grpc.health.v1: SERVING while Redis answers; checked every few seconds."""

    def __init__(self, store: Store, period_s: float = 2.0):
        self.servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.store = store
        self.period_s = period_s
        self._task: asyncio.Task | None = None

    async def _set(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            result = self.servicer.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def _watch(self) -> None:
        while True:
            try:
                await self.store.ping()
                await self._set(health_pb2.HealthCheckResponse.SERVING)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


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
            options=[("grpc.max_receive_message_length", max_bytes), ("grpc.so_reuseport", 0)]
        )
        pb_grpc.add_SinkServeServicer_to_server(
            SinkServeGateway(self.settings, self.store, self.backend), self.server
        )
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
        await self.server.start()
        self.health.start()
        logger.info("gateway listening on %s:%d", cfg.host, self.port)
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.health:
            self.health.stop()
        if self.server:
            await self.server.stop(grace_s)
        await self.store.close()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()
