"""The RPC handlers through a real gateway (real grpc.aio server and channel, real Redis); the replicas are faked.

Tenancy, quotas, the one-turn lock, the create-or-nothing rule, deadlines, cancellation, health and reflection.
The same behaviours run against real replicas in tests/integration/test_serving.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sinkserve import errors
from sinkserve.client import generation_settings
from sinkserve.gateway.interceptors import REQUEST_ID_KEY, RETRY_AFTER_KEY
from sinkserve.protocol import GenerationParams
from sinkserve.store.redis_server import free_port
from sinkserve.v1 import sinkserve_pb2 as pb


async def create(gw, metadata, **fields) -> pb.Session:
    return (await gw.stub.CreateSession(pb.CreateSessionRequest(**fields), metadata=metadata, timeout=10)).session


async def send(gw, metadata, sid: str, text: str = "hi", settings=None, timeout: float = 10) -> list:
    call = gw.stub.SendMessage(pb.SendMessageRequest(session_id=sid, text=text, settings=settings),
                               metadata=metadata, timeout=timeout)
    return [event async for event in call]


async def refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert caught.value.details()
    assert REQUEST_ID_KEY in dict(caught.value.trailing_metadata() or ())
    return caught.value


async def test_a_turn_streams_deltas_then_finished(gw):
    metadata = await gw.tenant("acme")
    session = await create(gw, metadata, system_prompt="Be brief.", labels={"team": "a"})
    assert session.cache_capacity == 32 and session.cache_entries == 3 and session.system_prompt == "Be brief."
    t0 = time.time()
    events = await send(gw, metadata, session.session_id, "hello", timeout=30)
    assert [e.delta.text for e in events if e.HasField("delta")] == ["Hello", " there", "!"]
    assert events[-1].finished.usage.total_tokens == 7 and events[-1].finished.replica == "r-1"
    call = gw.backend.chats[-1]
    assert call.params == GenerationParams(max_tokens=256)  # the gateway's default
    assert t0 + 25 < call.deadline_unix <= time.time() + 31  # the client's deadline, as unix time
    assert not await gw.store.sessions.is_busy(session.session_id)  # the turn lock is released


async def test_no_deadline_means_the_longest_turn(gw):
    from sinkserve.gateway.server import MAX_TURN_S

    metadata = await gw.tenant("acme")
    sid = (await create(gw, metadata)).session_id
    call = gw.stub.SendMessage(pb.SendMessageRequest(session_id=sid, text="hi"), metadata=metadata)
    [event async for event in call]
    assert gw.backend.chats[-1].deadline_unix == pytest.approx(time.time() + MAX_TURN_S, abs=5)


async def test_another_tenants_session_is_the_same_not_found_as_a_random_id(gw):
    """No existence oracle: bob cannot tell alice's session from one that does not exist."""
    alice, bob = await gw.tenant("alice"), await gw.tenant("bob")
    sid = (await create(gw, alice)).session_id
    random_id = uuid.uuid4().hex

    async def answers(session_id: str) -> list[tuple[grpc.StatusCode, str]]:
        got = []
        for call in (
            gw.stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=bob, timeout=10),
            send(gw, bob, session_id),
            gw.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=bob, timeout=10),
        ):
            err = await refused(call, grpc.StatusCode.NOT_FOUND)
            got.append((err.code(), err.details().replace(session_id, "<id>")))
        return got

    expected = [(grpc.StatusCode.NOT_FOUND, "session '<id>' not found")] * 3
    assert await answers(sid) == await answers(random_id) == expected
    assert list((await gw.stub.ListSessions(pb.ListSessionsRequest(), metadata=bob, timeout=10)).sessions) == []
    assert gw.backend.chats == [] and gw.backend.deleted == []
    mine = await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=alice, timeout=10)
    assert mine.session_id == sid


async def test_a_missing_session_is_not_found(gw):
    metadata = await gw.tenant("acme")
    for missing in ("nope", uuid.uuid4().hex):
        await refused(gw.stub.GetSession(pb.GetSessionRequest(session_id=missing), metadata=metadata, timeout=10),
                      grpc.StatusCode.NOT_FOUND)
        await refused(send(gw, metadata, missing), grpc.StatusCode.NOT_FOUND)
        await refused(gw.stub.DeleteSession(pb.DeleteSessionRequest(session_id=missing), metadata=metadata,
                                            timeout=10), grpc.StatusCode.NOT_FOUND)


async def test_no_key_is_unauthenticated_on_every_rpc(gw):
    for call in (
        gw.stub.CreateSession(pb.CreateSessionRequest(), timeout=10),
        gw.stub.GetSession(pb.GetSessionRequest(session_id="x"), timeout=10),
        gw.stub.ListSessions(pb.ListSessionsRequest(), timeout=10),
        gw.stub.DeleteSession(pb.DeleteSessionRequest(session_id="x"), timeout=10),
        send(gw, (("authorization", "Bearer sk-ss-nope"),), "x"),
    ):
        await refused(call, grpc.StatusCode.UNAUTHENTICATED)


async def test_a_second_concurrent_turn_is_aborted(gw):
    metadata = await gw.tenant("acme")
    sid = (await create(gw, metadata)).session_id
    assert await gw.store.sessions.try_lock_turn(sid, "another-turn", 10_000)
    await refused(send(gw, metadata, sid), grpc.StatusCode.ABORTED)
    assert gw.backend.chats == []
    assert await gw.store.sessions.is_busy(sid)  # the other turn's lock is not ours to release
    await gw.store.sessions.unlock_turn(sid, "another-turn")
    gw.backend.chat_error = errors.SessionBusy("session is still replying")  # the replica's own check
    await refused(send(gw, metadata, sid), grpc.StatusCode.ABORTED)
    assert not await gw.store.sessions.is_busy(sid)


async def test_tenant_session_limit_is_resource_exhausted(gw):
    metadata = await gw.tenant("small", max_sessions=1)
    await create(gw, metadata)
    await refused(gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_tokens_per_minute_is_resource_exhausted_with_retry_after(gw):
    metadata = await gw.tenant("thrifty", tokens_per_minute=300)
    sid = (await create(gw, metadata)).session_id
    if gw.store.tenants.seconds_to_next_window() < 2:  # charge and send in the same one-minute window
        await asyncio.sleep(gw.store.tenants.seconds_to_next_window())
    await gw.store.redis.incrby(gw.store.keys.tokens_per_minute("thrifty", time.time()), 290)
    # "hi" with max_tokens 5 may need 2 + 32 + 5 tokens: 290 + 39 > 300.
    err = await refused(send(gw, metadata, sid, settings=generation_settings(max_tokens=5)),
                        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "290 of its 300 tokens" in err.details()
    retry_ms = int(dict(err.trailing_metadata())[RETRY_AFTER_KEY])
    assert 0 <= retry_ms <= 60_000
    assert gw.backend.chats == []
    assert not await gw.store.sessions.is_busy(sid) and await gw.store.tenants.tokens_reserved("thrifty") == 0


async def test_a_turn_that_can_never_fit_the_quota_says_so_without_a_retry_hint(gw):
    metadata = await gw.tenant("tiny", tokens_per_minute=100)
    sid = (await create(gw, metadata)).session_id
    err = await refused(send(gw, metadata, sid, settings=generation_settings(max_tokens=200)),
                        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "fewer max_tokens" in err.details() and RETRY_AFTER_KEY not in dict(err.trailing_metadata())
    await send(gw, metadata, sid, settings=generation_settings(max_tokens=20))  # 2 + 32 + 20 fits
    assert len(gw.backend.chats) == 1


async def test_a_session_no_replica_takes_is_deleted(gw):
    metadata = await gw.tenant("acme")
    gw.backend.create_error = errors.ReplicaUnavailable("no model replica is available; retry shortly")
    await refused(gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10),
                  grpc.StatusCode.UNAVAILABLE)
    assert list((await gw.stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10)).sessions) == []
    assert await gw.store.sessions.count_sessions("acme") == 0


async def test_the_client_hanging_up_stops_the_replicas_generator(gw):
    metadata = await gw.tenant("acme")
    sid = (await create(gw, metadata)).session_id
    gw.backend.endless = True
    call = gw.stub.SendMessage(pb.SendMessageRequest(session_id=sid, text="go"), metadata=metadata, timeout=30)
    first = await call.read()
    assert first.delta.text
    call.cancel()
    backend_call = gw.backend.chats[-1]
    await asyncio.wait_for(backend_call.closed.wait(), 10)
    assert backend_call.cancelled
    for _ in range(100):  # the lock is released in the handler's finally, shielded
        if not await gw.store.sessions.is_busy(sid):
            break
        await asyncio.sleep(0.05)
    assert not await gw.store.sessions.is_busy(sid)


async def test_a_client_deadline_ends_the_turn(gw):
    metadata = await gw.tenant("acme")
    sid = (await create(gw, metadata)).session_id
    gw.backend.endless = True
    await refused_deadline(send(gw, metadata, sid, timeout=0.5))
    backend_call = gw.backend.chats[-1]
    await asyncio.wait_for(backend_call.closed.wait(), 10)
    assert backend_call.deadline_unix <= time.time()
    gw.backend.endless = False
    gw.backend.chat_error = errors.DeadlineExceeded("the turn ran past its deadline and was stopped")
    for _ in range(100):
        if not await gw.store.sessions.is_busy(sid):
            break
        await asyncio.sleep(0.05)
    await refused(send(gw, metadata, sid), grpc.StatusCode.DEADLINE_EXCEEDED)  # the replica's own deadline


async def refused_deadline(call) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_replica_failures_during_a_turn_are_mapped(gw):
    metadata = await gw.tenant("acme")
    sid = (await create(gw, metadata)).session_id
    gw.backend.chat_error = errors.NotOwner("session is owned by another replica")
    err = await refused(send(gw, metadata, sid), grpc.StatusCode.UNAVAILABLE)
    assert "retry" in err.details()
    gw.backend.chat_error = RuntimeError("engine pid=99 died at 10.0.0.1:1234")
    err = await refused(send(gw, metadata, sid), grpc.StatusCode.INTERNAL)
    assert err.details() == "internal error"
    assert not await gw.store.sessions.is_busy(sid)


async def test_get_session_asks_the_owner_and_survives_its_absence(gw):
    metadata = await gw.tenant("acme")
    sid = (await create(gw, metadata)).session_id
    assert (await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata)).cache_entries == 0
    await gw.store.redis.hset(gw.store.keys.session(sid), "owner", "r-1")
    info = await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)
    assert (info.owner_replica, info.cache_entries, info.cache_capacity, info.tokens_seen) == ("r-1", 9, 32, 9)
    gw.backend.info_error = errors.ReplicaUnavailable("no model replica is available")
    info = await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)
    assert (info.owner_replica, info.cache_entries) == ("r-1", 0)


async def test_list_pages_and_delete(gw):
    metadata = await gw.tenant("acme")
    created = [(await create(gw, metadata)).session_id for _ in range(5)]
    seen, token = [], ""
    while True:
        page = await gw.stub.ListSessions(pb.ListSessionsRequest(page_size=2, page_token=token), metadata=metadata)
        assert len(page.sessions) <= 2
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == created
    await gw.store.redis.hset(gw.store.keys.session(created[0]), "owner", "r-1")
    await gw.stub.DeleteSession(pb.DeleteSessionRequest(session_id=created[0]), metadata=metadata, timeout=10)
    assert gw.backend.deleted == [created[0]]
    await refused(gw.stub.GetSession(pb.GetSessionRequest(session_id=created[0]), metadata=metadata, timeout=10),
                  grpc.StatusCode.NOT_FOUND)


async def test_session_defaults_are_kept_and_shown(gw):
    metadata = await gw.tenant("acme")
    session = await create(gw, metadata, default_settings=generation_settings(stop=["END"], top_k=5))
    info = await gw.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), metadata=metadata)
    assert list(info.default_settings.stop) == ["END"] and info.default_settings.top_k == 5
    await send(gw, metadata, session.session_id)
    assert gw.backend.chats[-1].params == GenerationParams(max_tokens=256, top_k=5, stop=("END",))


async def test_health_and_reflection(gw):
    health = health_pb2_grpc.HealthStub(gw.channel)
    for service in ("", "sinkserve.v1.SinkServe"):
        for _ in range(100):  # NOT_SERVING until the first check of Redis has answered
            status = (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            await asyncio.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
    call = reflect.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert {"sinkserve.v1.SinkServe", "grpc.health.v1.Health"} <= names


async def test_redis_down_is_unavailable_and_not_serving(make_gateway):
    gw = await make_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    err = await refused(gw.stub.CreateSession(pb.CreateSessionRequest(),
                                              metadata=(("authorization", "Bearer sk-ss-x"),), timeout=30),
                        grpc.StatusCode.UNAVAILABLE)
    assert err.details() == "session store unavailable"
    for service in ("", "sinkserve.v1.SinkServe"):
        reply = await health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("method", ["CreateSession", "GetSession", "SendMessage"])
async def test_bytes_that_do_not_decode_are_invalid_argument(gw, method):
    """Issue 11 item 8: invalid UTF-8 in a string field, or a corrupt message, is INVALID_ARGUMENT with a short
    message and a request id, never UNKNOWN with a Python class name; the handler never runs."""
    metadata = await gw.tenant(f"bytes-{method.lower()}")
    bad_utf8 = b"\x0a\x03\xff\xfe\xfd"  # field 1, a string, holding bytes that are not UTF-8
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"  # a length running past the end
    path = f"/{pb.DESCRIPTOR.services_by_name['SinkServe'].full_name}/{method}"
    for payload in (bad_utf8, corrupt):
        if method == "SendMessage":
            call = gw.channel.unary_stream(path)(payload, metadata=metadata, timeout=10)
            caught = await refused(_drain_raw(call), grpc.StatusCode.INVALID_ARGUMENT)
        else:
            caught = await refused(gw.channel.unary_unary(path)(payload, metadata=metadata, timeout=10),
                                   grpc.StatusCode.INVALID_ARGUMENT)
        assert "decoded" in caught.details() and "Error" not in caught.details()
    assert gw.backend.chats == []


async def _drain_raw(call):
    return [event async for event in call]
