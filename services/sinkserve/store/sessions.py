"""Session records, the one-turn-at-a-time lock and the transcript log.

A turn is acknowledged only once its tokens are in the transcript, and only the session's current owner
may write it: ``append_transcript`` checks owner and epoch in the same atomic step as the write, so a
replica that lost a session can never record a turn for it. The same step records the turn's result
(``TurnRecord``: client request id, reply text, finish reason, usage) among the session's last turns, so a
retry with the same request id finds the turn however it ended (finished, cut by a hang-up, a deadline or a
gateway crash).

The turn lock is a lease: ``try_lock_turn`` takes it for a few seconds and the gateway streaming the turn renews
it (``renew_turn_lock``) until the turn ends; a gateway that dies stops renewing and the lock lapses.

Only ids of the server-generated form (``keys.SESSION_ID``) reach Redis; any other is SessionNotFound.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from sinkserve.errors import Fenced, InvalidArgument, SessionExists, TenantSessionLimit
from sinkserve.store import scripts
from sinkserve.store.client import now_ms, pack_tokens, unpack_tokens
from sinkserve.store.keys import Keys, is_session_id, session_not_found

# How many of a session's last turns keep their result (for retries by request id, and GetSession).
RECENT_TURNS = 16


def message_digest(text: str) -> str:
    """A short digest of a user message: a retry's message must be the one its request id was first used with."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TurnRecord:
    """What one recorded turn answered: written with its transcript entry, read back by a retry."""

    request_id: str  # the client's idempotency key ("" when it gave none)
    text: str  # the whole reply text recorded (a cut turn: the part generated before the cut)
    finish_reason: str  # eos, length, stop, aborted
    prompt_tokens: int
    completion_tokens: int
    replica: str
    message_digest: str = ""  # message_digest() of the user message
    turn_id: str = ""  # the gateway's id of the turn (its session lock and token reservation)
    turn: int = 0  # the session's turn count after it (set by the store when it records the turn)

    @property
    def finished(self) -> bool:
        """The reply ended by itself (not cut short)."""
        return self.finish_reason != "aborted"

    def to_json(self) -> str:
        fields = asdict(self)
        fields.pop("turn")  # the append numbers it
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_entry(cls, entry: bytes) -> "TurnRecord":
        turn, _, body = entry.decode().partition("|")
        return cls(**{**json.loads(body), "turn": int(turn)})


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
    member: str  # its entry in the tenant's session zset (the pagination cursor)

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


class Sessions:
    def __init__(self, client: aioredis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._create = scripts.register(client, "create")
        self._append = scripts.register(client, "append")
        self._transcript_ends = scripts.register(client, "transcript_ends")
        self._delete = scripts.register(client, "delete")
        self._unlock = scripts.register(client, "unlock")
        self._lock_renew = scripts.register(client, "lock_renew")

    # ---- records
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
        """A new session with no owner; the tenant's limit is checked in the same atomic step."""
        sid = session_id or uuid.uuid4().hex
        if not is_session_id(sid):
            raise InvalidArgument("a session id is 32 lowercase hex digits")
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
        flat = [item for pair in fields.items() for item in pair]
        result = await self._create(
            keys=[self.keys.session(sid), self.keys.tenant_sessions(tenant)], args=[max_sessions, member, *flat]
        )
        if result == 0:
            raise TenantSessionLimit(f"tenant {tenant!r} has reached its limit of {max_sessions} live sessions")
        if result == -1:
            raise SessionExists(f"session {sid} already exists")
        return await self.get_session(sid)

    async def get_session(self, sid: str) -> SessionRecord:
        raw = await self.redis.hgetall(self.keys.session(sid))
        if not raw:
            raise session_not_found(sid)
        return SessionRecord.from_hash(sid, raw)

    async def get_sessions(self, sids: list[str]) -> list[SessionRecord | None]:
        """Records in the order asked; None for a session deleted meanwhile (or an id that cannot be one)."""
        valid = [sid for sid in sids if is_session_id(sid)]
        pipe = self.redis.pipeline(transaction=False)
        for sid in valid:
            pipe.hgetall(self.keys.session(sid))
        found = {sid: SessionRecord.from_hash(sid, raw) for sid, raw in zip(valid, await pipe.execute()) if raw}
        return [found.get(sid) for sid in sids]

    async def list_sessions(self, tenant: str, page_size: int, after: str = "") -> tuple[list[str], str]:
        """A page of the tenant's session ids (oldest first) and the cursor of the next page ("" = last)."""
        start = f"({after}" if after else "-"
        members = await self.redis.zrangebylex(
            self.keys.tenant_sessions(tenant), start, "+", start=0, num=page_size + 1
        )
        members = [m.decode() for m in members]
        more = len(members) > page_size
        members = members[:page_size]
        return [m.split("|", 1)[1] for m in members], (members[-1] if more and members else "")

    async def count_sessions(self, tenant: str) -> int:
        return int(await self.redis.zcard(self.keys.tenant_sessions(tenant)))

    async def delete_session(self, sid: str, tenant: str) -> bool:
        """Remove the session with its transcript, lease, lock and ownership; False if there was none."""
        keys = self.keys
        names = [keys.session(sid), keys.transcript(sid), keys.lease(sid), keys.busy(sid), keys.tenant_sessions(tenant),
                 keys.recent_turns(sid)]
        return bool(await self._delete(keys=names, args=[sid, *keys.replica_owned_affixes()]))

    # ---- one turn at a time
    async def try_lock_turn(self, sid: str, turn_id: str, ttl_ms: int) -> bool:
        """Take the session's turn lock for `ttl_ms` (a lease: the holder renews it while its turn runs)."""
        return bool(await self.redis.set(self.keys.busy(sid), turn_id, nx=True, px=max(1, ttl_ms)))

    async def renew_turn_lock(self, sid: str, turn_id: str, ttl_ms: int) -> bool:
        """Extend the lease if `turn_id` still holds the lock; False when it lapsed or another turn holds it."""
        return bool(await self._lock_renew(keys=[self.keys.busy(sid)], args=[turn_id, max(1, ttl_ms)]))

    async def unlock_turn(self, sid: str, turn_id: str) -> None:
        await self._unlock(keys=[self.keys.busy(sid)], args=[turn_id])

    async def turn_holder(self, sid: str) -> str | None:
        """The turn id holding the lock, or None."""
        value = await self.redis.get(self.keys.busy(sid))
        return value.decode() if value is not None else None

    async def is_busy(self, sid: str) -> bool:
        return bool(await self.redis.exists(self.keys.busy(sid)))

    # ---- recorded turns
    async def recent_turns(self, sid: str) -> list[TurnRecord]:
        """The session's last turns with their results, newest first (at most RECENT_TURNS)."""
        return [TurnRecord.from_entry(e) for e in await self.redis.lrange(self.keys.recent_turns(sid), 0, -1)]

    async def last_turn(self, sid: str) -> TurnRecord | None:
        entry = await self.redis.lindex(self.keys.recent_turns(sid), 0)
        return TurnRecord.from_entry(entry) if entry is not None else None

    async def recorded_turn(self, sid: str, request_id: str) -> TurnRecord | None:
        """The recorded turn of a client request id, if it is among the session's last turns."""
        if not request_id:
            return None
        return next((t for t in await self.recent_turns(sid) if t.request_id == request_id), None)

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
        turn: TurnRecord | None = None,
    ) -> int:
        """Append one entry, fenced by ownership; returns the session's turn count after it.

        ``charge_tokens`` go to the tenant's tokens-per-minute counter in the same atomic step, so a turn is
        charged exactly when it is recorded (aborted turns included); ``turn`` (its result) joins the session's
        recent turns in that step too, numbered with the turn count after the append. A turn whose gateway
        reserved tokens for it (``turn.turn_id``) is charged at most that reservation, which the step releases.
        """
        counter = self.keys.tokens_per_minute(tenant or "-", time.time())
        reservations = self.keys.tokens_reserved(tenant or "-")
        result = int(
            await self._append(
                keys=[self.keys.session(sid), self.keys.transcript(sid), counter, self.keys.recent_turns(sid),
                      reservations],
                args=[
                    replica_id,
                    epoch,
                    pack_tokens(token_ids),
                    len(token_ids),
                    1 if count_turn else 0,
                    charge_tokens if tenant else 0,
                    turn.to_json() if turn is not None else "",
                    RECENT_TURNS,
                    turn.turn_id if turn is not None and tenant else "",
                ],
            )
        )
        if result == -2:
            raise session_not_found(sid)
        if result == -1:
            raise Fenced(f"session {sid} is owned by another replica now")
        return result

    async def transcript(self, sid: str) -> list[list[int]]:
        """Every entry, in order (tests and drains; a rebuild reads only ``transcript_ends``)."""
        return [unpack_tokens(blob) for blob in await self.redis.lrange(self.keys.transcript(sid), 0, -1)]

    async def transcript_ends(self, sid: str, head_tokens: int, tail_tokens: int) -> tuple[list[int], int]:
        """At least the first `head_tokens` and the last `tail_tokens` ids of the transcript (whole entries,
        read from both ends only), and the transcript's total length: what a rebuild needs."""
        reply = await self._transcript_ends(
            keys=[self.keys.session(sid), self.keys.transcript(sid)], args=[head_tokens, tail_tokens]
        )
        total, blobs = int(reply[0]), reply[1:]
        return [t for blob in blobs for t in unpack_tokens(blob)], total

    async def transcript_len(self, sid: str) -> int:
        """Number of entries (not tokens) in the transcript."""
        return int(await self.redis.llen(self.keys.transcript(sid)))
