"""Which replica owns a session: claims that bump a fencing epoch, and the leases owners renew.

Ownership moves only through ``claim``, which bumps the session's epoch; every write an owner makes
(transcript appends, renewals, a release) names its epoch, so an owner that lost the session is refused.
A lease that lapses (its owner stopped renewing) lets routers re-home the session.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from sinkserve.store import scripts
from sinkserve.store.keys import Keys


class Ownership:
    def __init__(self, client: aioredis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._claim = scripts.register(client, "claim")
        self._renew = scripts.register(client, "renew")
        self._release = scripts.register(client, "release")

    async def claim(self, sid: str, expected_epoch: int, replica_id: str, lease_ms: int) -> tuple[int, str]:
        """Make ``replica_id`` the owner if the epoch is still ``expected_epoch``; returns (epoch, owner) after.

        Epoch -1 means the session is gone. If another claim won the race, its (epoch, owner) come back.
        """
        keys = self.keys
        epoch, owner = await self._claim(
            keys=[keys.session(sid), keys.lease(sid), keys.replica_owned(replica_id)],
            args=[expected_epoch, replica_id, int(lease_ms), sid, *keys.replica_owned_affixes()],
        )
        return int(epoch), owner.decode() if isinstance(owner, bytes) else owner

    async def renew(self, replica_id: str, leases: dict[str, int], lease_ms: int) -> dict[str, int]:
        """Renew the leases of the given {session: epoch}; returns {session: 1 renewed, 0 fenced, -1 gone}."""
        if not leases:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for sid, epoch in leases.items():
            await self._renew(
                keys=[self.keys.session(sid), self.keys.lease(sid)], args=[replica_id, epoch, int(lease_ms)], client=pipe
            )
        results = await pipe.execute()
        return {sid: int(r) for sid, r in zip(leases, results)}

    async def release(self, replica_id: str, leases: dict[str, int]) -> None:
        """Give the sessions up (a drain): they keep their epoch and have no owner until the next claim."""
        if not leases:
            return
        owned = self.keys.replica_owned(replica_id)
        pipe = self.redis.pipeline(transaction=False)
        for sid, epoch in leases.items():
            await self._release(
                keys=[self.keys.session(sid), self.keys.lease(sid), owned], args=[replica_id, epoch, sid], client=pipe
            )
        await pipe.execute()

    async def lease_alive(self, sid: str) -> bool:
        return bool(await self.redis.exists(self.keys.lease(sid)))
