"""The whole Redis keyspace: every key the project reads or writes is built here and nowhere else.

Layout (``p`` is ``RedisConfig.key_prefix``):

Sessions (``sessions.py``, ``ownership.py``)

    p:s:{sid}              hash   tenant, system_prompt, defaults, labels, created_ms, member,
                                  turns, tokens_seen, owner (replica id), epoch (fencing token)
    p:s:{sid}:tx           list   the transcript: one packed int32 blob of token ids per entry
    p:s:{sid}:lease        str    "epoch|replica" with a TTL the owner renews; gone = owner silent
    p:s:{sid}:busy         str    turn id of the turn in progress (SET NX: one turn at a time), a short lease
                                  the streaming gateway renews (gone = that gateway is gone)
    p:s:{sid}:turns        list   the last turns, newest first: "turn|json" (request id, reply text, finish
                                  reason, usage), written with the transcript entry (idempotent retries)
    p:t:{tenant}:sessions  zset   "created_ms|sid" members (lexicographic pagination), all score 0

Replicas (``replicas.py``)

    p:r:{replica}          str    the replica's JSON load report, with a TTL
    p:r:{replica}:sessions set    sessions the replica owns (its routing load)

Tenants (``tenants.py``)

    p:tenants              set    tenant names
    p:t:{name}             hash   name, max_sessions, tokens_per_minute, requests_per_second, request_burst,
                                  created_ms
    p:t:{name}:keys        set    SHA-256 digests of the tenant's API keys
    p:key:{digest}         str    tenant name
    p:t:{name}:tpm:{min}   int    tokens used in that minute (charged by the replica with the transcript)
    p:t:{name}:tpr         hash   tokens reserved by turns in flight: turn id -> "tokens|expiry ms"
    p:t:{name}:rps         hash   the request-rate token bucket: tokens, ms (last refill)

HTTP front end (``conversations.py``: the OpenAI-compatible API's handles on sessions)

    p:s:{sid}:chat         list   digests of the chat messages the session holds, in order (system, user,
                                  assistant, ...): a request whose messages extend them continues the session
    p:t:{name}:handle:{d}  str    session id bound to a client's ``x-session-id`` (``d``: its SHA-256 digest)
    p:resp:{id}            str    a Responses API response: JSON (tenant, session id, turn, the response body),
                                  with a TTL

Tenant names cannot contain ':' (``tenants.TENANT_NAME``), so ``p:t:{name}`` never collides with another
tenant's ``:sessions``/``:keys``/``:tpm``/``:tpr``/``:rps`` keys. Session ids have one strict form
(``SESSION_ID``: what ``Sessions.create_session`` generates); ``Keys.session`` refuses any other with
``SessionNotFound``, so no client-chosen id can name another key (``"<sid>:tx"``).
"""

from __future__ import annotations

import re

from sinkserve.errors import SessionNotFound

# The one form of a session id: uuid4().hex, 32 lowercase hex digits.
SESSION_ID = re.compile(r"[0-9a-f]{32}")
_SHOWN_ID = 40  # how much of a malformed id an error message repeats


def is_session_id(sid: object) -> bool:
    return isinstance(sid, str) and SESSION_ID.fullmatch(sid) is not None


def session_not_found(sid: str) -> SessionNotFound:
    """The one answer for a session that is not there, is not the caller's, or cannot be an id at all."""
    shown = sid if len(sid) <= _SHOWN_ID else sid[:_SHOWN_ID] + "..."
    return SessionNotFound(f"session {shown!r} not found")


def check_session_id(sid: str) -> str:
    """``sid`` if it has the session id form; SessionNotFound otherwise (before any key is built from it)."""
    if not is_session_id(sid):
        raise session_not_found(sid if isinstance(sid, str) else repr(sid))
    return sid

# Stands in for a replica id to split ``replica_owned`` into the parts a Lua script joins around an owner
# it reads inside the script (any string that cannot be a replica id).
_PLACEHOLDER = "\x00"


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    # ---- sessions
    def session(self, sid: str) -> str:
        """Every session key derives from this one, so a malformed id never reaches Redis."""
        return f"{self.prefix}:s:{check_session_id(sid)}"

    def transcript(self, sid: str) -> str:
        return f"{self.session(sid)}:tx"

    def lease(self, sid: str) -> str:
        return f"{self.session(sid)}:lease"

    def busy(self, sid: str) -> str:
        return f"{self.session(sid)}:busy"

    def recent_turns(self, sid: str) -> str:
        return f"{self.session(sid)}:turns"

    def tenant_sessions(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:sessions"

    def chat_digests(self, sid: str) -> str:
        return f"{self.session(sid)}:chat"

    # ---- HTTP front end
    def session_handle(self, tenant: str, handle_digest: str) -> str:
        return f"{self.tenant(tenant)}:handle:{handle_digest}"

    def response(self, response_id: str) -> str:
        return f"{self.prefix}:resp:{response_id}"

    # ---- replicas
    def replica_report(self, replica_id: str) -> str:
        return f"{self.prefix}:r:{replica_id}"

    def replica_owned(self, replica_id: str) -> str:
        return f"{self.replica_report(replica_id)}:sessions"

    def replica_owned_affixes(self) -> tuple[str, str]:
        """(head, tail) with ``head .. replica .. tail == replica_owned(replica)``: for the Lua scripts that
        must name the owned set of an owner they only learn inside the script."""
        head, tail = self.replica_owned(_PLACEHOLDER).split(_PLACEHOLDER)
        return head, tail

    # ---- tenants
    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def tenant(self, name: str) -> str:
        return f"{self.prefix}:t:{name}"

    def tenant_keys(self, name: str) -> str:
        return f"{self.tenant(name)}:keys"

    def api_key(self, key_digest: str) -> str:
        return f"{self.prefix}:key:{key_digest}"

    def tokens_per_minute(self, tenant: str, unix_time: float) -> str:
        """The tenant's token counter for the minute holding ``unix_time`` (fixed one-minute windows)."""
        return f"{self.tenant(tenant)}:tpm:{int(unix_time // 60)}"

    def tokens_reserved(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:tpr"

    def request_bucket(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:rps"
