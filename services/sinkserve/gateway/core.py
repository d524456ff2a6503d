"""The gateway's transport-free logic: tenants, quotas, sessions and turns, called by every front end.

The gRPC handlers (``server.py``) and the OpenAI-compatible HTTP routes (``sinkserve.http``) both call a
``GatewayCore``; each converts its wire messages to and from the typed values (``sinkserve.protocol``) and maps
``sinkserve.errors`` to its own statuses in one table. Nothing here knows grpc or HTTP: a turn learns that its
client hung up through the ``cancelled`` callable its front end passes, and stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Mapping

from sinkserve.config import Settings
from sinkserve.errors import InvalidArgument, ResourceExhausted, SessionBusy, SinkServeError, Unauthenticated
from sinkserve.gateway.limits import Limits
from sinkserve.protocol import GenerationParams, SessionView, TurnEvent
from sinkserve.store import SessionRecord, Store, Tenant, Tenants, TurnRecord
from sinkserve.store.keys import session_not_found
from sinkserve.store.sessions import message_digest

logger = logging.getLogger("sinkserve.gateway")

# Longest a turn may run when the client set no deadline.
MAX_TURN_S = 900.0


def raise_if_cancelled(cancelled: Callable[[], bool] | None = None) -> None:
    """Stop here if the client hung up. On Python 3.11 a Redis call can swallow the cancellation of the handler's
    task (redis-py's send uses asyncio.wait_for, CPython gh-86296): the request counts, not the exception."""
    task = asyncio.current_task()
    if (cancelled is not None and cancelled()) or (task is not None and task.cancelling()):
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


class GatewayCore:
    """Everything a front end does with tenants, sessions and turns, in typed values."""

    def __init__(self, settings: Settings, store: Store, backend: Any):
        self.settings = settings
        self.limits = Limits(settings.gateway)
        self.store = store
        self.backend = backend

    # ------------------------------------------------------------------ tenants
    async def authenticate(self, api_key: str | None) -> Tenant:
        """The tenant of an API key, after taking the call from its request-rate bucket."""
        if api_key is None:
            raise Unauthenticated("missing 'authorization: Bearer <api key>'")
        return await authenticate(self.store.tenants, api_key)

    # ------------------------------------------------------------------ sessions
    async def own_session(self, tenant: Tenant, session_id: str) -> SessionRecord:
        self.limits.check_session_id(session_id)
        record = await self.store.sessions.get_session(session_id)  # SessionNotFound when there is none
        if record.tenant != tenant.name:
            raise session_not_found(session_id)  # the same answer as for no session: existence is not revealed
        return record

    async def create_session(self, tenant: Tenant, system_prompt: str = "", defaults: Mapping[str, Any] | None = None,
                             labels: Mapping[str, str] | None = None,
                             cancelled: Callable[[], bool] | None = None) -> tuple[SessionRecord, SessionView]:
        self.limits.check_text(system_prompt, "system_prompt")
        checked = self.limits.session_defaults(dict(defaults or {}))
        record = await self.store.sessions.create_session(
            tenant.name, max_sessions=tenant.max_sessions, system_prompt=system_prompt,
            defaults=checked, labels=self.limits.check_labels(labels or {}),
        )
        try:
            raise_if_cancelled(cancelled)
            view = await self.backend.create(session_id=record.session_id)
        except BaseException:
            # No replica took it: the session must not exist half-made.
            await asyncio.shield(self._forget(record))
            raise
        return await self.store.sessions.get_session(record.session_id), view

    async def _forget(self, record: SessionRecord) -> None:
        try:
            await self.store.sessions.delete_session(record.session_id, record.tenant)
        except Exception:  # noqa: BLE001 - the create's own failure is the answer
            logger.warning("could not delete the half-made session %s", record.session_id, exc_info=True)

    async def session_info(self, tenant: Tenant, session_id: str
                           ) -> tuple[SessionRecord, SessionView | None, bool, TurnRecord | None]:
        record = await self.own_session(tenant, session_id)
        busy = await self.store.sessions.is_busy(record.session_id)
        last_turn = await self.store.sessions.last_turn(record.session_id)
        view = None
        if record.owner:
            try:
                view = await self.backend.info(session_id=record.session_id)
            except SinkServeError as err:  # the registry still answers; the cache fields stay 0
                logger.info("info(%s) failed: %s", record.session_id, err.message)
        return record, view, busy, last_turn

    async def list_sessions(self, tenant: Tenant, page_size: int, after: str) -> tuple[list[SessionRecord], str]:
        ids, next_member = await self.store.sessions.list_sessions(tenant.name, self.limits.page_size(page_size),
                                                                   after)
        records = await self.store.sessions.get_sessions(ids)
        return [r for r in records if r is not None], next_member

    async def delete_session(self, tenant: Tenant, session_id: str) -> None:
        record = await self.own_session(tenant, session_id)
        if record.owner:
            try:  # free the slot now; if this fails the owner notices at its next lease renewal
                await self.backend.delete(session_id=record.session_id)
            except SinkServeError as err:
                logger.info("delete(%s) on the replica failed: %s", record.session_id, err.message)
        await self.store.sessions.delete_session(record.session_id, tenant.name)

    # ------------------------------------------------------------------ turns
    async def send_message(
        self, tenant: Tenant, session_id: str, text: str, fields: Mapping[str, Any], request_id: str = "",
        time_remaining_s: float | None = None, cancelled: Callable[[], bool] | None = None,
    ) -> AsyncIterator[TurnEvent | TurnRecord]:
        """One turn: the replica's TurnDelta/TurnFinished events, or (a retry of a request id already recorded)
        its TurnRecord alone. Holds the session's turn lock and the tenant's token reservation while it runs."""
        self.limits.check_message(text)
        request_id = self.limits.check_request_id(request_id)
        record = await self.own_session(tenant, session_id)
        sid = record.session_id
        params = self.limits.turn_params(record.defaults, fields)
        recorded = await self._recorded_turn(sid, request_id, text)
        if recorded is not None:  # a retry of a turn already recorded: its answer, not a second turn
            yield recorded
            return
        turn_s = min(time_remaining_s, MAX_TURN_S) if time_remaining_s is not None else MAX_TURN_S
        deadline_unix = time.time() + turn_s
        turn_id = uuid.uuid4().hex
        lease_s = self.settings.gateway.turn_lease_s
        if not await self.store.sessions.try_lock_turn(sid, turn_id, int(lease_s * 1000)):
            raise SessionBusy(f"session {sid} is still replying to a previous message")
        lease = TurnLease(self.store, sid, tenant.name, turn_id, lease_s).start()
        try:
            # Recorded between the look above and the lock (the first attempt ended meanwhile)?
            recorded = await self._recorded_turn(sid, request_id, text)
            if recorded is not None:
                yield recorded
                return
            await self._reserve_tokens(tenant, record, text, params, turn_id, lease.lease_ms)
            raise_if_cancelled(cancelled)
            async for event in self.backend.chat(
                session_id=sid, text=text, params=params, deadline_unix=deadline_unix, turn_id=turn_id,
                request_id=request_id or None,
            ):
                yield event
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


async def authenticate(tenants: Tenants, api_key: str) -> Tenant:
    """The tenant of `api_key` (Unauthenticated when none), after taking the call from its request-rate bucket
    (ResourceExhausted with a retry hint when it is empty): the same for gRPC and HTTP."""
    tenant = await tenants.authenticate(api_key)
    if tenant is None:
        raise Unauthenticated("unknown API key")
    wait_s = await tenants.take_request(tenant)
    if wait_s is not None:
        raise ResourceExhausted(
            f"tenant {tenant.name!r} is over its request rate ({tenant.requests_per_second:g}/s, burst "
            f"{tenant.request_burst}); retry in {wait_s:.2f}s",
            retry_after_s=wait_s,
        )
    return tenant
