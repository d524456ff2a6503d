"""Gateway unit tests: a real grpc.aio server on 127.0.0.1:0 and a real channel; a real redis-server where tenants,
sessions or locks are involved. The fake is only the replica side (``FakeBackend``), which needs Ray and a model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
import pytest

from sinkserve.config import RedisConfig, Settings
from sinkserve.protocol import GenerationParams, SessionView, TurnDelta, TurnEvent, TurnFinished
from sinkserve.store import Store


@pytest.fixture
async def store(redis_server, request):
    """A store under a key prefix of its own on the shared redis-server."""
    store = Store.from_config(RedisConfig(url=redis_server.url, key_prefix=f"gw-{request.node.name}"))
    yield store
    await store.close()


@dataclass
class ChatCall:
    session_id: str
    text: str
    params: GenerationParams
    deadline_unix: float | None
    turn_id: str | None = None
    request_id: str | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the gateway stopped consuming the stream
    cancelled: bool = False


class FakeBackend:
    """Stands in for ServeBackend (the replicas): answers like a replica, or raises what a test sets."""

    def __init__(self) -> None:
        self.create_error: BaseException | None = None
        self.info_error: BaseException | None = None
        self.chat_error: BaseException | None = None
        self.events: list[TurnEvent] = [TurnDelta("Hello", 1), TurnDelta(" there", 1),
                                        TurnFinished("eos", 5, 2, 1, "r-1", 7, text="!")]
        self.endless = False  # chat streams deltas until the gateway stops reading
        self.delay_s = 0.0  # a pause before each event (turns that overlap)
        # Set to a Store: sessions are claimed by "r-1" at create, and each turn is recorded in the transcript the
        # way a replica records it (charged, with its TurnRecord; a cut turn as "aborted"), before `finished`.
        self.store: Store | None = None
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.chats: list[ChatCall] = []

    async def create(self, session_id: str) -> SessionView:
        if self.create_error is not None:
            raise self.create_error
        self.created.append(session_id)
        if self.store is not None:
            await self.store.ownership.claim(session_id, 0, "r-1", 60_000)
        return SessionView(session_id, "r-1", resident=True, cache_entries=3, cache_capacity=32)

    async def info(self, session_id: str) -> SessionView:
        if self.info_error is not None:
            raise self.info_error
        return SessionView(session_id, "r-1", resident=True, cache_entries=9, cache_capacity=32, tokens_seen=9)

    async def delete(self, session_id: str) -> bool:
        self.deleted.append(session_id)
        return True

    async def chat(self, session_id: str, text: str, params: GenerationParams, deadline_unix: float | None,
                   turn_id: str | None = None, request_id: str | None = None) -> AsyncIterator[TurnEvent]:
        call = ChatCall(session_id, text, params, deadline_unix, turn_id, request_id)
        self.chats.append(call)
        reply: list[str] = []
        recorded = False
        try:
            if self.chat_error is not None:
                raise self.chat_error
            if self.endless:
                while True:
                    reply.append("more ")
                    yield TurnDelta("more ", 1)
                    await asyncio.sleep(0.01)
            for event in self.events:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if isinstance(event, TurnFinished) and self.store is not None:
                    recorded = True
                    turn = await self.record(call, "".join(reply) + event.text, event.finish_reason,
                                             event.prompt_tokens, event.completion_tokens)
                    event = TurnFinished(event.finish_reason, event.prompt_tokens, event.completion_tokens, turn,
                                         event.replica, event.cache_entries, event.text)
                elif isinstance(event, TurnDelta):
                    reply.append(event.text)
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            call.cancelled = True
            if self.store is not None and not recorded:  # a replica records what the cut turn produced
                await asyncio.shield(self.record(call, "".join(reply), "aborted", 3, len(reply)))
            raise
        finally:
            call.closed.set()

    async def record(self, call: ChatCall, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> int:
        from sinkserve.store import TurnRecord
        from sinkserve.store.sessions import message_digest

        assert self.store is not None
        record = await self.store.sessions.get_session(call.session_id)
        return await self.store.sessions.append_transcript(
            call.session_id, "r-1", record.epoch, [1] * (prompt_tokens + completion_tokens), count_turn=True,
            tenant=record.tenant, charge_tokens=prompt_tokens + completion_tokens,
            turn=TurnRecord(call.request_id or "", text, reason, prompt_tokens, completion_tokens, "r-1",
                            message_digest(call.text), call.turn_id or ""),
        )


@dataclass
class GatewayUnderTest:
    gateway: Any
    backend: FakeBackend
    channel: grpc.aio.Channel
    stub: Any

    @property
    def store(self) -> Store:
        return self.gateway.store

    async def tenant(self, name: str, **quotas: Any) -> tuple[tuple[str, str], ...]:
        """Create a tenant; returns the call metadata carrying its key."""
        _, key = await self.store.tenants.create(name, **quotas)
        return (("authorization", f"Bearer {key}"),)


def gateway_settings(redis_url: str, prefix: str, **gateway: Any) -> Settings:
    return Settings(
        redis={"url": redis_url, "key_prefix": prefix, "socket_timeout_s": 2},
        gateway={"host": "127.0.0.1", "port": 0, "max_message_bytes": 1024, "max_new_tokens": 500, **gateway},
    )


@pytest.fixture
async def make_gateway(redis_server, request):
    """Start Gateways (real server, real Redis, FakeBackend) on the test's loop; all stopped after the test."""
    from sinkserve.gateway.server import Gateway
    from sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc

    started: list[GatewayUnderTest] = []

    async def make(redis_url: str | None = None, **gateway: Any) -> GatewayUnderTest:
        prefix = f"gw-{request.node.name}-{len(started)}"
        backend = FakeBackend()
        gw = Gateway(gateway_settings(redis_url or redis_server.url, prefix, **gateway), backend)
        port = await gw.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        made = GatewayUnderTest(gw, backend, channel, pb_grpc.SinkServeStub(channel))
        started.append(made)
        return made

    yield make
    for made in started:
        await made.channel.close()
        await made.gateway.stop(grace_s=0)


@pytest.fixture
async def gw(make_gateway) -> GatewayUnderTest:
    return await make_gateway()
