"""Which sessions this replica owns, under which epoch, and the heartbeat that keeps the claim alive.

Ownership lives in the registry (store.ownership): a session moves only through a claim that bumps its epoch,
so a replica that lost a session can never record a turn for it. This replica keeps the epochs it holds, renews
their leases, publishes its load report, and drops the cache of any session it finds it no longer owns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sinkserve.errors import NotOwner, SessionNotFound
from sinkserve.store import LoadReport, SessionRecord, Store

logger = logging.getLogger("sinkserve.replica")


class Ownership:
    def __init__(self, store: Store, replica_id: str, lease_ttl_s: float):
        self.store = store
        self.replica_id = replica_id
        self.lease_ms = int(lease_ttl_s * 1000)
        self.owned: dict[str, int] = {}  # session -> epoch this replica holds it under

    async def ensure(self, record: SessionRecord, on_lost: Callable[[str], Awaitable[None]]) -> int:
        """The epoch under which this replica owns the session, claiming it if it has no owner. Raises NotOwner
        (after dropping any copy of the session here) when another replica owns it."""
        sid = record.session_id
        if record.owner == self.replica_id:
            epoch = record.epoch
        elif record.owner == "":
            epoch, owner = await self.store.ownership.claim(sid, record.epoch, self.replica_id, self.lease_ms)
            if epoch < 0:
                raise SessionNotFound(f"session {sid} not found")
            if owner != self.replica_id:
                await self.lose(sid, on_lost)
                raise NotOwner(f"session {sid} is owned by another replica")
        else:
            await self.lose(sid, on_lost)
            raise NotOwner(f"session {sid} is owned by another replica")
        self.owned[sid] = epoch
        return epoch

    async def lose(self, session_id: str, on_lost: Callable[[str], Awaitable[None]]) -> None:
        """The session moved elsewhere (or is gone): our copy of its cache must never serve again."""
        self.owned.pop(session_id, None)
        await on_lost(session_id)

    async def renew(self, on_lost: Callable[[str], Awaitable[None]], active: set[str]) -> None:
        results = await self.store.ownership.renew(self.replica_id, dict(self.owned), self.lease_ms)
        for sid, result in results.items():
            if result != 1:  # fenced (moved elsewhere) or deleted
                self.owned.pop(sid, None)
                if sid not in active:
                    await on_lost(sid)

    async def release_all(self) -> None:
        """Graceful shutdown: hand every session back so routers re-home them now instead of waiting for the
        leases to lapse (the transcripts make the move lossless)."""
        await self.store.ownership.release(self.replica_id, dict(self.owned))
        self.owned.clear()


class Heartbeat:
    """Publishes the load report every interval and renews leases every third of their TTL."""

    def __init__(self, ownership: Ownership, report: Callable[[], Awaitable[LoadReport]],
                 renew: Callable[[], Awaitable[None]], interval_s: float, lease_ttl_s: float):
        self.ownership = ownership
        self._report, self._renew = report, renew
        self.interval_s = interval_s
        self.renew_every_s = max(lease_ttl_s / 3, interval_s)
        self.task: asyncio.Task | None = None

    @property
    def report_ttl_ms(self) -> int:
        return int(max(3 * self.interval_s, 5) * 1000)

    def start(self) -> "Heartbeat":
        self.task = asyncio.get_running_loop().create_task(self._beat())
        return self

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    @property
    def failed(self) -> BaseException | None:
        if self.task is None or not self.task.done() or self.task.cancelled():
            return None
        return self.task.exception()

    async def publish(self) -> None:
        await self.ownership.store.replicas.report_load(await self._report(), ttl_ms=self.report_ttl_ms)

    async def _beat(self) -> None:
        next_renew = 0.0
        while True:
            try:
                await self.publish()
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + self.renew_every_s
                    await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis blips must not kill the replica
                logger.warning("heartbeat failed", exc_info=True)
            await asyncio.sleep(self.interval_s)
