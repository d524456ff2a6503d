"""The HTTP front end's state beside the session registry: chat-message digests per session, client session
handles (``x-session-id``), and Responses API records (response id -> session). Keys in ``keys.py``."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis.asyncio as aioredis

from sinkserve.store.keys import Keys, is_session_id

RESPONSE_TTL_S = 30 * 24 * 3600
HANDLE_TTL_S = 30 * 24 * 3600


def handle_digest(handle: str) -> str:
    return hashlib.sha256(handle.encode()).hexdigest()


class Conversations:
    def __init__(self, client: aioredis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys

    # ---- chat message digests
    async def chat_digests(self, sid: str) -> list[str]:
        return [d.decode() for d in await self.redis.lrange(self.keys.chat_digests(sid), 0, -1)]

    async def set_chat_digests(self, sid: str, digests: list[str]) -> None:
        key = self.keys.chat_digests(sid)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        if digests:
            pipe.rpush(key, *digests)
            pipe.expire(key, HANDLE_TTL_S)
        await pipe.execute()

    async def add_chat_digests(self, sid: str, digests: list[str]) -> None:
        if digests:
            key = self.keys.chat_digests(sid)
            pipe = self.redis.pipeline(transaction=True)
            pipe.rpush(key, *digests)
            pipe.expire(key, HANDLE_TTL_S)
            await pipe.execute()

    # ---- x-session-id handles
    async def handle(self, tenant: str, handle: str) -> str | None:
        sid = await self.redis.get(self.keys.session_handle(tenant, handle_digest(handle)))
        sid = sid.decode() if sid is not None else None
        return sid if is_session_id(sid) else None

    async def bind_handle(self, tenant: str, handle: str, sid: str) -> None:
        await self.redis.set(self.keys.session_handle(tenant, handle_digest(handle)), sid, ex=HANDLE_TTL_S)

    # ---- responses
    async def save_response(self, response_id: str, record: dict[str, Any]) -> None:
        await self.redis.set(self.keys.response(response_id), json.dumps(record), ex=RESPONSE_TTL_S)

    async def response(self, response_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.response(response_id))
        return json.loads(raw) if raw is not None else None
