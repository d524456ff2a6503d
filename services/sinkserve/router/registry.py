"""Session state in Redis: metadata, the transcript log, ownership with fencing leases, replica load.

Every gateway, every request router and every replica talks to the same Redis through this class, so
they agree on which replica owns a session. Layout (``p`` is ``RedisConfig.key_prefix``):

    p:s:{sid}              hash   tenant, system_prompt, defaults, labels, created_ms, member,
                                  turns, tokens_seen, owner (replica id), epoch (fencing token)
    p:s:{sid}:tx           list   the transcript: one packed int32 blob of token ids per entry
    p:s:{sid}:lease        str    "epoch|replica" with a TTL the owner renews; gone = owner silent
    p:s:{sid}:busy         str    turn id of the turn in progress (SET NX: one turn at a time)
    p:t:{tenant}:sessions  zset   "created_ms|sid" members (lexicographic pagination), all score 0
    p:r:{replica}          str    the replica's JSON load report, with a TTL
    p:r:{replica}:sessions set    sessions the replica owns (its routing load)

Ownership moves only through ``claim``, which bumps the epoch; a replica writes the transcript only while
``owner``/``epoch`` are still its own (``append_transcript`` checks both atomically), so a replica that
lost a session can never record a turn for it.
"""

from __future__ import annotations

import array
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from sinkserve.config import RedisConfig


def connect(cfg: RedisConfig) -> aioredis.Redis:
    """An asyncio Redis client bound to the running event loop (create one per loop).

    The pool blocks (up to the socket timeout) when every connection is busy instead of failing at once:
    a burst of a thousand turns must queue for a connection, not turn into UNAVAILABLE."""
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url,
        password=cfg.password.get_secret_value() if cfg.password else None,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
        decode_responses=False,
        max_connections=cfg.max_connections,
        timeout=cfg.socket_timeout_s,
    )
    return aioredis.Redis(connection_pool=pool, auto_close_connection_pool=True)


def pack_tokens(token_ids: list[int]) -> bytes:
    data = array.array("i", token_ids)
    if sys.byteorder != "little":  # the log is little-endian whatever host wrote it
        data.byteswap()
    return data.tobytes()


def unpack_tokens(blob: bytes) -> list[int]:
    data = array.array("i")
    data.frombytes(blob)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tolist()


def tpm_key(prefix: str, tenant: str, unix_time: float) -> str:
    """The tenant's token counter for the minute holding ``unix_time`` (fixed one-minute windows)."""
    return f"{prefix}:t:{tenant}:tpm:{int(unix_time // 60)}"


def now_ms() -> int:
    return int(time.time() * 1000)


class SessionGone(Exception):
    """The session was deleted (or never existed)."""


class Fenced(Exception):
    """This replica no longer owns the session (another replica claimed it since)."""


class TenantSessionLimit(Exception):
    """The tenant already has its maximum number of live sessions."""


@dataclass
class SessionRecord:
    session_id: str
    tenant: str
    system_prompt: str
    defaults: dict[str, Any]
    labels: dict[str, str]
    created_ms: int
    turns: int
    tokens_seen: int
    owner: str
    epoch: int
    member: str

    @classmethod
    def from_hash(cls, session_id: str, raw: dict[bytes, bytes]) -> "SessionRecord":
        get = lambda key, default=b"": raw.get(key.encode(), default)  # noqa: E731
        return cls(
            session_id=session_id,
            tenant=get("tenant").decode(),
            system_prompt=get("system_prompt").decode(),
            defaults=json.loads(get("defaults", b"{}") or b"{}"),
            labels=json.loads(get("labels", b"{}") or b"{}"),
            created_ms=int(get("created_ms", b"0")),
            turns=int(get("turns", b"0")),
            tokens_seen=int(get("tokens_seen", b"0")),
            owner=get("owner").decode(),
            epoch=int(get("epoch", b"0")),
            member=get("member").decode(),
        )


@dataclass
class LoadReport:
    replica_id: str
    sessions: int = 0  # sessions resident in the engine's slab
    owned: int = 0  # sessions the registry assigns to this replica
    free_slots: int = 0
    max_sessions: int = 0
    queue: int = 0  # turns waiting for or running in the engine
    draining: bool = False
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # room for later counters (parking...)
    reported_ms: int = 0


_CREATE = """
-- KEYS: session hash, tenant zset. ARGV: max sessions, member, then field/value pairs.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
"""

_CLAIM = """
-- KEYS: session hash, lease. ARGV: expected epoch, new owner, ttl ms, key prefix, session id.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then return {epoch, owner} end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'epoch', epoch)
redis.call('SET', KEYS[2], epoch .. '|' .. ARGV[2], 'PX', ARGV[3])
if owner ~= '' then redis.call('SREM', ARGV[4] .. ':r:' .. owner .. ':sessions', ARGV[5]) end
redis.call('SADD', ARGV[4] .. ':r:' .. ARGV[2] .. ':sessions', ARGV[5])
return {epoch, ARGV[2]}
"""

_RENEW = """
-- KEYS: session hash, lease. ARGV: owner, epoch, ttl ms. 1 = renewed, 0 = fenced, -1 = gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2] .. '|' .. ARGV[1], 'PX', ARGV[3])
return 1
"""

_APPEND = """
-- KEYS: session hash, transcript, tenant's tokens-per-minute counter.
-- ARGV: owner, epoch, blob, tokens, turn increment, tokens to charge the tenant.
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return -1 end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'tokens_seen', ARGV[4])
if tonumber(ARGV[6]) > 0 then
  redis.call('INCRBY', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[3], 120)
end
return redis.call('HINCRBY', KEYS[1], 'turns', ARGV[5])
"""

_TRANSCRIPT_ENDS = """
-- KEYS: session hash, transcript. ARGV: head tokens, tail tokens (4 bytes per token in an entry).
-- Reads entries from the front until `head` tokens and from the back until `tail` tokens, never the middle
-- of a long log. Reply: {total tokens, head entries..., tail entries...}.
local n = redis.call('LLEN', KEYS[2])
local want_head, want_tail = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, head_tokens, i = {}, 0, 0
while i < n and head_tokens < want_head do
  local blob = redis.call('LINDEX', KEYS[2], i)
  out[#out + 1] = blob
  head_tokens = head_tokens + #blob / 4
  i = i + 1
end
local tail, tail_tokens, j = {}, 0, n - 1
while j >= i and tail_tokens < want_tail do
  local blob = redis.call('LINDEX', KEYS[2], j)
  tail[#tail + 1] = blob
  tail_tokens = tail_tokens + #blob / 4
  j = j - 1
end
for k = #tail, 1, -1 do out[#out + 1] = tail[k] end
local total = head_tokens + tail_tokens
if j >= i then total = tonumber(redis.call('HGET', KEYS[1], 'tokens_seen') or '0') end  -- entries skipped
table.insert(out, 1, total)
return out
"""

_RELEASE = """
-- KEYS: session hash, lease. ARGV: owner, epoch, key prefix, session id. Gives a session up (drain).
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'owner', '')
redis.call('DEL', KEYS[2])
redis.call('SREM', ARGV[3] .. ':r:' .. ARGV[1] .. ':sessions', ARGV[4])
return 1
"""

_DELETE = """
-- KEYS: session hash, transcript, lease, busy, tenant zset. ARGV: key prefix, session id.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local member = redis.call('HGET', KEYS[1], 'member') or ''
if owner ~= '' then redis.call('SREM', ARGV[1] .. ':r:' .. owner .. ':sessions', ARGV[2]) end
redis.call('ZREM', KEYS[5], member)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Registry:
    """Session registry + transcript log + load reports over one asyncio Redis client."""

    def __init__(self, client: aioredis.Redis, prefix: str = "sinkserve"):
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._append = client.register_script(_APPEND)
        self._release = client.register_script(_RELEASE)
        self._transcript_ends = client.register_script(_TRANSCRIPT_ENDS)
        self._delete = client.register_script(_DELETE)
        self._unlock = client.register_script(_UNLOCK)

    @classmethod
    def from_config(cls, cfg: RedisConfig) -> "Registry":
        return cls(connect(cfg), cfg.key_prefix)

    async def close(self) -> None:
        await self.redis.aclose()

    # ---- keys
    def session_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}"

    def _tx(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:tx"

    def _lease(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:lease"

    def _busy(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:busy"

    def _tenant_sessions(self, tenant: str) -> str:
        return f"{self.prefix}:t:{tenant}:sessions"

    def _report(self, rid: str) -> str:
        return f"{self.prefix}:r:{rid}"

    def _owned(self, rid: str) -> str:
        return f"{self.prefix}:r:{rid}:sessions"

    # ---- sessions
    async def create_session(
        self,
        tenant: str,
        *,
        max_sessions: int,
        system_prompt: str = "",
        defaults: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        session_id: str | None = None,
    ) -> SessionRecord:
        sid = session_id or uuid.uuid4().hex
        created = now_ms()
        member = f"{created:013d}|{sid}"
        fields = {
            "tenant": tenant,
            "system_prompt": system_prompt,
            "defaults": json.dumps(defaults or {}),
            "labels": json.dumps(labels or {}),
            "created_ms": created,
            "member": member,
            "turns": 0,
            "tokens_seen": 0,
            "owner": "",
            "epoch": 0,
        }
        flat: list[Any] = []
        for key, value in fields.items():
            flat += [key, value]
        result = await self._create(
            keys=[self.session_key(sid), self._tenant_sessions(tenant)], args=[max_sessions, member, *flat]
        )
        if result == 0:
            raise TenantSessionLimit(f"tenant {tenant!r} has reached its limit of {max_sessions} live sessions")
        if result == -1:
            raise ValueError(f"session {sid} already exists")
        return await self.get_session(sid)

    async def get_session(self, sid: str) -> SessionRecord:
        raw = await self.redis.hgetall(self.session_key(sid))
        if not raw:
            raise SessionGone(sid)
        return SessionRecord.from_hash(sid, raw)

    async def get_sessions(self, sids: list[str]) -> list[SessionRecord | None]:
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hgetall(self.session_key(sid))
        return [SessionRecord.from_hash(sid, raw) if raw else None for sid, raw in zip(sids, await pipe.execute())]

    async def list_sessions(self, tenant: str, page_size: int, after: str = "") -> tuple[list[str], str]:
        """A page of the tenant's session ids (oldest first) and the cursor of the next page ("" = last)."""
        start = f"({after}" if after else "-"
        members = await self.redis.zrangebylex(self._tenant_sessions(tenant), start, "+", start=0, num=page_size + 1)
        members = [m.decode() for m in members]
        more = len(members) > page_size
        members = members[:page_size]
        return [m.split("|", 1)[1] for m in members], (members[-1] if more and members else "")

    async def count_sessions(self, tenant: str) -> int:
        return int(await self.redis.zcard(self._tenant_sessions(tenant)))

    async def delete_session(self, sid: str, tenant: str) -> bool:
        keys = [self.session_key(sid), self._tx(sid), self._lease(sid), self._busy(sid), self._tenant_sessions(tenant)]
        return bool(await self._delete(keys=keys, args=[self.prefix, sid]))

    # ---- one turn at a time
    async def try_lock_turn(self, sid: str, turn_id: str, ttl_ms: int) -> bool:
        return bool(await self.redis.set(self._busy(sid), turn_id, nx=True, px=max(1, ttl_ms)))

    async def unlock_turn(self, sid: str, turn_id: str) -> None:
        await self._unlock(keys=[self._busy(sid)], args=[turn_id])

    async def is_busy(self, sid: str) -> bool:
        return bool(await self.redis.exists(self._busy(sid)))

    # ---- ownership
    async def claim(self, sid: str, expected_epoch: int, replica_id: str, lease_ms: int) -> tuple[int, str]:
        """Make ``replica_id`` the owner if the epoch is still ``expected_epoch``; returns (epoch, owner) after.

        Epoch -1 means the session is gone. If another claim won the race, its (epoch, owner) come back.
        """
        epoch, owner = await self._claim(
            keys=[self.session_key(sid), self._lease(sid)],
            args=[expected_epoch, replica_id, int(lease_ms), self.prefix, sid],
        )
        return int(epoch), owner.decode() if isinstance(owner, bytes) else owner

    async def renew(self, replica_id: str, leases: dict[str, int], lease_ms: int) -> dict[str, int]:
        """Renew the leases of the given {session: epoch}; returns {session: 1 renewed, 0 fenced, -1 gone}."""
        if not leases:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for sid, epoch in leases.items():
            await self._renew(
                keys=[self.session_key(sid), self._lease(sid)], args=[replica_id, epoch, int(lease_ms)], client=pipe
            )
        results = await pipe.execute()
        return {sid: int(r) for sid, r in zip(leases, results)}

    async def release(self, replica_id: str, leases: dict[str, int]) -> None:
        if not leases:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sid, epoch in leases.items():
            await self._release(
                keys=[self.session_key(sid), self._lease(sid)], args=[replica_id, epoch, self.prefix, sid], client=pipe
            )
        await pipe.execute()

    async def lease_alive(self, sid: str) -> bool:
        return bool(await self.redis.exists(self._lease(sid)))

    # ---- transcript
    async def append_transcript(
        self,
        sid: str,
        replica_id: str,
        epoch: int,
        token_ids: list[int],
        count_turn: bool,
        tenant: str = "",
        charge_tokens: int = 0,
    ) -> int:
        """Append one entry, fenced by ownership; returns the session's turn count after it.

        ``charge_tokens`` go to the tenant's tokens-per-minute counter in the same atomic step, so a turn is
        charged exactly when it is recorded (aborted turns included).
        """
        result = int(
            await self._append(
                keys=[self.session_key(sid), self._tx(sid), tpm_key(self.prefix, tenant or "-", time.time())],
                args=[
                    replica_id,
                    epoch,
                    pack_tokens(token_ids),
                    len(token_ids),
                    1 if count_turn else 0,
                    charge_tokens if tenant else 0,
                ],
            )
        )
        if result == -2:
            raise SessionGone(sid)
        if result == -1:
            raise Fenced(f"replica {replica_id} no longer owns session {sid} (epoch {epoch})")
        return result

    async def transcript(self, sid: str) -> list[list[int]]:
        return [unpack_tokens(blob) for blob in await self.redis.lrange(self._tx(sid), 0, -1)]

    async def transcript_ends(self, sid: str, head_tokens: int, tail_tokens: int) -> tuple[list[int], int]:
        """At least the first `head_tokens` and the last `tail_tokens` ids of the transcript (whole entries,
        read from both ends only), and the transcript's total length: what a rebuild needs."""
        reply = await self._transcript_ends(keys=[self.session_key(sid), self._tx(sid)],
                                            args=[head_tokens, tail_tokens])
        total, blobs = int(reply[0]), reply[1:]
        return [t for blob in blobs for t in unpack_tokens(blob)], total

    async def transcript_len(self, sid: str) -> int:
        return int(await self.redis.llen(self._tx(sid)))

    # ---- replica load
    async def report_load(self, report: LoadReport, ttl_ms: int) -> None:
        report.reported_ms = now_ms()
        await self.redis.set(self._report(report.replica_id), json.dumps(asdict(report)), px=max(1, int(ttl_ms)))

    async def drop_report(self, replica_id: str) -> None:
        await self.redis.delete(self._report(replica_id))

    async def loads(self, replica_ids: list[str]) -> dict[str, tuple[int, LoadReport | None]]:
        """{replica: (sessions it owns in the registry, its latest live load report or None)}."""
        pipe = self.redis.pipeline(transaction=False)
        for rid in replica_ids:
            pipe.scard(self._owned(rid))
            pipe.get(self._report(rid))
        raw = await pipe.execute()
        out: dict[str, tuple[int, LoadReport | None]] = {}
        for i, rid in enumerate(replica_ids):
            owned, report = raw[2 * i], raw[2 * i + 1]
            out[rid] = (int(owned), LoadReport(**json.loads(report)) if report else None)
        return out

    async def owned_by(self, replica_id: str) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(self._owned(replica_id))}
