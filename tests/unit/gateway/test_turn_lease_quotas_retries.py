"""Issue 11 through a real gateway (real grpc.aio server and channel, real Redis; the replicas faked): the turn lock
is a lease the streaming gateway renews, token quotas are reserved before a turn and never overrun, each tenant
has a request-rate bucket, retries with a request id get the recorded turn, and two authorization headers are
refused.

The fake backend records turns the way a replica does (``FakeBackend.store``): the transcript entry, the charge
and the turn's record in one append, a cut turn as "aborted".
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from sinkserve.client import generation_settings
from sinkserve.gateway.interceptors import RETRY_AFTER_KEY
from sinkserve.protocol import TurnDelta, TurnFinished
from sinkserve.v1 import sinkserve_pb2 as pb


async def create(gw, metadata) -> str:
    return (await gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10)).session.session_id


def request(sid: str, text: str = "hi", request_id: str = "", **settings) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(session_id=sid, text=text, request_id=request_id,
                                 settings=generation_settings(**settings))


async def send(gw, metadata, sid: str, text: str = "hi", request_id: str = "", timeout: float = 10, **settings):
    call = gw.stub.SendMessage(request(sid, text, request_id, **settings), metadata=metadata, timeout=timeout)
    return [event async for event in call]


def reply(events) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def until(predicate, attempts: int = 500) -> None:
    """Poll `predicate` a bounded number of times, 20 ms apart (a state check, not a timing one)."""
    for _ in range(attempts):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await call
    return caught.value


# ---------------------------------------------------------------------------------------------- item 2: lease
async def test_the_turn_lock_is_a_lease_renewed_while_the_turn_streams(make_gateway):
    gw = await make_gateway(turn_lease_s=0.3)
    metadata = await gw.tenant("acme")
    sid = await create(gw, metadata)
    gw.backend.endless = True
    call = gw.stub.SendMessage(request(sid), metadata=metadata, timeout=30)
    assert (await call.read()).delta.text
    turn_id = gw.backend.chats[-1].turn_id
    assert turn_id and await gw.store.sessions.turn_holder(sid) == turn_id  # the replica gets the lock's turn id
    for _ in range(5):  # well past the lease: still held, and never for longer than one lease
        await asyncio.sleep(0.3)
        assert await gw.store.sessions.turn_holder(sid) == turn_id
        assert 0 < await gw.store.redis.pttl(gw.store.keys.busy(sid)) <= 300
        assert await gw.store.tenants.tokens_reserved("acme") > 0  # the reservation is renewed with it
    call.cancel()
    await until(lambda: _not(gw.store.sessions.is_busy(sid)))
    assert await gw.store.tenants.tokens_reserved("acme") == 0


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_a_lock_whose_gateway_died_lapses_and_the_session_is_served_again(make_gateway):
    """A gateway killed mid-turn renews nothing: its lock is gone within one lease and the next turn runs."""
    gw = await make_gateway(turn_lease_s=0.3)
    metadata = await gw.tenant("acme")
    sid = await create(gw, metadata)
    assert await gw.store.sessions.try_lock_turn(sid, "turn-of-a-dead-gateway", 300)
    # the lock lives one lease unless renewed: its expiry is in Redis, not in a wall-clock bound here
    assert 0 < await gw.store.redis.pttl(gw.store.keys.busy(sid)) <= 300
    err = await refusal(send(gw, metadata, sid))
    assert err.code() == grpc.StatusCode.ABORTED
    await until(lambda: _not(gw.store.sessions.is_busy(sid)))  # nobody renews it: it lapses
    events = await send(gw, metadata, sid)
    assert events[-1].HasField("finished")
    assert not await gw.store.sessions.is_busy(sid)


async def test_a_stale_holder_cannot_renew_or_release_another_turns_lock(store):
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    assert await store.sessions.try_lock_turn(sid, "old", 50)
    assert await store.sessions.renew_turn_lock(sid, "old", 10_000)
    await store.sessions.unlock_turn(sid, "old")
    assert await store.sessions.try_lock_turn(sid, "new", 10_000)
    assert not await store.sessions.renew_turn_lock(sid, "old", 60_000)
    await store.sessions.unlock_turn(sid, "old")
    assert await store.sessions.turn_holder(sid) == "new"
    assert await store.redis.pttl(store.keys.busy(sid)) <= 10_000


# ---------------------------------------------------------------------------------------------- item 3: quotas
async def test_concurrent_turns_never_charge_more_than_the_tokens_per_minute(make_gateway):
    """20 turns at once against 300 tokens/min, each of which really uses its worst case (5-byte message + 32
    template allowance + max_tokens 10 = 47 tokens): 6 fit (282), the rest are refused with a retry hint, and the
    tokens charged stay within the limit. Without the reservation all 20 would start (nothing was used yet)."""
    gw = await make_gateway()
    gw.backend.store = gw.store
    gw.backend.delay_s = 0.2
    gw.backend.events = [TurnDelta("reply", 1), TurnFinished("length", 37, 10, 0, "r-1", 7)]
    metadata = await gw.tenant("capped", tokens_per_minute=300)
    sids = [await create(gw, metadata) for _ in range(20)]
    if gw.store.tenants.seconds_to_next_window() < 5:  # all of it inside one one-minute window
        await asyncio.sleep(gw.store.tenants.seconds_to_next_window())
    results = await asyncio.gather(*(send(gw, metadata, sid, "hello", max_tokens=10) for sid in sids),
                                   return_exceptions=True)
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(served) + len(refused) == 20
    assert len(served) == 6
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert 0 <= int(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) <= 60_000
    assert await gw.store.tenants.tokens_used("capped") == 6 * 47 <= 300
    assert await gw.store.tenants.tokens_reserved("capped") == 0  # every reservation released
    assert [await gw.store.sessions.is_busy(sid) for sid in sids] == [False] * 20


async def test_a_reservation_whose_gateway_died_lapses(store):
    await store.tenants.create("acme", tokens_per_minute=100)
    assert (await store.tenants.reserve_tokens("acme", "t1", 60, 100, 200)).granted
    refused = await store.tenants.reserve_tokens("acme", "t2", 60, 100, 10_000)
    assert (refused.granted, refused.used, refused.reserved) == (False, 0, 60)
    await asyncio.sleep(0.3)  # t1's gateway never renewed it
    assert (await store.tenants.reserve_tokens("acme", "t2", 60, 100, 10_000)).granted
    assert await store.tenants.renew_tokens("acme", "t2", 10_000)
    assert not await store.tenants.renew_tokens("acme", "t1", 10_000)
    await store.tenants.release_tokens("acme", "t2")
    assert await store.tenants.tokens_reserved("acme") == 0


async def test_the_request_rate_bucket_refuses_calls_beyond_it(make_gateway):
    """300 GetSession calls in about 3 s against 20/s with a burst of 40: about 40 + 20 x 3 pass, the rest get
    RESOURCE_EXHAUSTED with a retry hint; another tenant and the health service are not affected."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gw = await make_gateway()
    metadata = await gw.tenant("chatty", requests_per_second=20, request_burst=40)
    other = await gw.tenant("quiet")
    sid = await create(gw, metadata)  # one request taken
    started = time.monotonic()
    outcomes = []
    for _ in range(30):  # 10 calls every 0.1 s
        calls = [gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)
                 for _ in range(10)]
        outcomes += await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    passed = [o for o in outcomes if isinstance(o, pb.Session)]
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(passed) + len(refused) == 300
    assert 39 <= len(passed) <= 40 + 20 * elapsed + 1, (len(passed), elapsed)
    assert len(refused) >= 300 - (41 + 20 * elapsed)
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request rate" in err.details()
        assert 0 < int(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) <= 1000
    quiet = await gw.stub.ListSessions(pb.ListSessionsRequest(), metadata=other, timeout=10)
    assert list(quiet.sessions) == []
    health = health_pb2_grpc.HealthStub(gw.channel)
    for _ in range(60):
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)


async def test_tenant_quotas_default_to_the_limits_config(store):
    tenant, _ = await store.tenants.create("acme", requests_per_second=2.5, request_burst=3)
    assert (tenant.requests_per_second, tenant.request_burst) == (2.5, 3)
    assert await store.tenants.get("acme") == tenant
    default, _ = await store.tenants.create("plain")
    assert (default.requests_per_second, default.request_burst) == (100.0, 400)
    await store.redis.hdel(store.keys.tenant("plain"), "requests_per_second", "request_burst")  # an older record
    assert (await store.tenants.get("plain")) == default


# ---------------------------------------------------------------------------------------------- item 9: retries
async def test_a_retry_with_the_same_request_id_gets_the_recorded_turn(gw):
    gw.backend.store = gw.store
    metadata = await gw.tenant("acme")
    sid = await create(gw, metadata)
    first = await send(gw, metadata, sid, "hello", request_id="req-1")
    assert reply(first) == "Hello there!" and not first[-1].finished.replayed
    again = await send(gw, metadata, sid, "hello", request_id="req-1")
    assert reply(again) == "Hello there!"
    assert again[-1].finished.replayed
    assert (again[-1].finished.turn, again[-1].finished.usage, again[-1].finished.finish_reason) == (
        first[-1].finished.turn, first[-1].finished.usage, first[-1].finished.finish_reason)
    assert len(gw.backend.chats) == 1  # not run again
    assert await gw.store.sessions.transcript_len(sid) == 1  # no second transcript entry
    err = await refusal(send(gw, metadata, sid, "something else", request_id="req-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()
    second = await send(gw, metadata, sid, "hello", request_id="req-2")  # a new id is a new turn
    assert not second[-1].finished.replayed and second[-1].finished.turn == 2
    info = await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)
    last = info.last_turn
    assert (last.turn, last.text, last.finished, last.request_id) == (2, "Hello there!", True, "req-2")
    assert last.finish_reason == pb.FINISH_REASON_EOS and last.usage.total_tokens == 7


async def test_a_cut_turn_retried_with_its_id_returns_the_recorded_part_as_aborted(gw):
    gw.backend.store = gw.store
    gw.backend.endless = True
    metadata = await gw.tenant("acme")
    sid = await create(gw, metadata)
    call = gw.stub.SendMessage(request(sid, "tell me", "req-cut"), metadata=metadata, timeout=30)
    assert (await call.read()).delta.text
    # A retry while the first attempt still runs: ABORTED, as for any second turn.
    err = await refusal(send(gw, metadata, sid, "tell me", request_id="req-cut"))
    assert err.code() == grpc.StatusCode.ABORTED
    call.cancel()
    await until(lambda: _not(gw.store.sessions.is_busy(sid)))
    recorded = await gw.store.sessions.recorded_turn(sid, "req-cut")
    assert recorded is not None and recorded.finish_reason == "aborted" and recorded.text.startswith("more ")
    retry = await send(gw, metadata, sid, "tell me", request_id="req-cut")
    assert reply(retry) == recorded.text
    final = retry[-1].finished
    assert final.replayed and final.finish_reason == pb.FINISH_REASON_ABORTED and final.turn == 1
    assert len(gw.backend.chats) == 1 and await gw.store.sessions.transcript_len(sid) == 1
    info = await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)
    assert info.last_turn.text == recorded.text and not info.last_turn.finished


# ---------------------------------------------------------------------------------------------- item 10
async def test_two_authorization_headers_are_unauthenticated(gw):
    (header,) = await gw.tenant("acme")
    (other,) = await gw.tenant("globex")
    for metadata in ((header, header), (header, other), (header, ("authorization", "Bearer sk-ss-nope"))):
        err = await refusal(gw.stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "more than one" in err.details()
        err = await refusal(send(gw, metadata, "0" * 32))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list((await gw.stub.ListSessions(pb.ListSessionsRequest(), metadata=(header,), timeout=10)).sessions) == []
