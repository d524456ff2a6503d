"""Gateway validation: every refused setting or request gets INVALID_ARGUMENT with a clear message.

First the limits on their own (GenerationParams judges the settings, ``Limits`` adds the deployment's bounds), then
the same refusals through a real gateway (real grpc.aio server and channel, real Redis, the replicas faked): the
client sees INVALID_ARGUMENT with the message, and nothing reaches a replica or the store.
"""

from __future__ import annotations

import math
import uuid

import grpc
import pytest

from sinkserve.client import generation_settings
from sinkserve.config import GatewayConfig
from sinkserve.errors import InvalidArgument, SessionNotFound
from sinkserve.gateway.convert import settings_to_fields
from sinkserve.gateway.limits import MAX_PAGE_SIZE, Limits
from sinkserve.store import Keys
from sinkserve.v1 import sinkserve_pb2 as pb

MAX_NEW_TOKENS = 500  # as in conftest.gateway_settings
LIMITS = Limits(GatewayConfig(max_message_bytes=1024, max_new_tokens=MAX_NEW_TOKENS))

# (fields a client set, words the message must contain)
REFUSED_SETTINGS = {
    "max_tokens zero": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens over the gateway limit": ({"max_tokens": MAX_NEW_TOKENS + 1}, f"between 1 and {MAX_NEW_TOKENS}"),
    "negative temperature": ({"temperature": -1.0}, "temperature"),
    "nan temperature": ({"temperature": math.nan}, "temperature"),
    "infinite temperature": ({"temperature": math.inf}, "temperature"),
    "top_p zero": ({"top_p": 0.0}, "top_p"),
    "top_p over one": ({"top_p": 1.5}, "top_p"),
    "zero repetition penalty": ({"repetition_penalty": 0.0}, "repetition_penalty"),
    "nan repetition penalty": ({"repetition_penalty": math.nan}, "repetition_penalty"),
    "seed of 2^63": ({"seed": 2**63}, "seed"),
    "empty stop string": ({"stop": [""]}, "stop"),
    "too many stop strings": ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    "stop strings too long": ({"stop": ["x" * 1025]}, "stop"),
}


@pytest.mark.parametrize("fields, words", REFUSED_SETTINGS.values(), ids=REFUSED_SETTINGS.keys())
def test_refused_turn_settings(fields, words):
    with pytest.raises(InvalidArgument) as caught:
        LIMITS.turn_params({}, fields)
    assert words in caught.value.message


@pytest.mark.parametrize("fields, words", REFUSED_SETTINGS.values(), ids=REFUSED_SETTINGS.keys())
def test_refused_session_defaults(fields, words):
    with pytest.raises(InvalidArgument) as caught:
        LIMITS.session_defaults(fields)
    assert words in caught.value.message


def test_unknown_settings_are_refused():
    with pytest.raises(InvalidArgument, match="unknown generation settings: nucleus"):
        LIMITS.turn_params({}, {"nucleus": 0.5})


def test_max_tokens_defaults_to_min_256_and_the_gateway_limit():
    assert LIMITS.turn_params({}, {}).max_tokens == 256
    small = Limits(GatewayConfig(max_new_tokens=100))
    assert small.turn_params({}, {}).max_tokens == 100
    assert small.turn_params({"max_tokens": 7}, {}).max_tokens == 7


def test_turn_settings_override_the_session_defaults():
    defaults = LIMITS.session_defaults({"temperature": 0.5, "stop": ("END",), "max_tokens": 20})
    assert defaults == {"temperature": 0.5, "stop": ["END"], "max_tokens": 20}  # still partial, JSON-ready
    params = LIMITS.turn_params(defaults, {"max_tokens": 5})
    assert (params.max_tokens, params.temperature, params.stop) == (5, 0.5, ("END",))


def test_messages_and_prompts_are_bounded_in_bytes():
    LIMITS.check_message("x" * 1024)
    with pytest.raises(InvalidArgument, match="text is 1025 bytes; the limit is 1024"):
        LIMITS.check_message("x" * 1025)
    with pytest.raises(InvalidArgument, match="text is 1026 bytes"):
        LIMITS.check_message("é" * 513)  # bytes, not characters
    for blank in ("", "   ", "\n\t"):
        with pytest.raises(InvalidArgument, match="text is empty"):
            LIMITS.check_message(blank)
    with pytest.raises(InvalidArgument, match="system_prompt is 1025 bytes"):
        LIMITS.check_text("y" * 1025, "system_prompt")


def key_named_ids(keys: Keys, sid: str) -> list[str]:
    """Ids that, put after the session key's prefix, would name the session's other keys: `<sid>:tx`, ..."""
    head = keys.session(sid)[: -len(sid)]
    return [key.removeprefix(head) for key in (keys.transcript(sid), keys.lease(sid), keys.busy(sid),
                                               keys.recent_turns(sid))]


def test_session_ids_labels_and_page_sizes():
    with pytest.raises(InvalidArgument, match="session_id is required"):
        LIMITS.check_session_id("")
    sid = uuid.uuid4().hex
    LIMITS.check_session_id(sid)
    # Anything but the server-generated form is the NOT_FOUND of an unknown id (never a store error).
    for bad in (*key_named_ids(Keys("p"), sid), sid.upper(), sid + "0", sid[:-1], "s" * 129, "x" * 100_000, " " + sid):
        with pytest.raises(SessionNotFound, match="not found"):
            LIMITS.check_session_id(bad)
    assert LIMITS.check_labels({"a": "b"}) == {"a": "b"}
    with pytest.raises(InvalidArgument, match="at most 32 labels"):
        LIMITS.check_labels({f"k{i}": "v" for i in range(33)})
    with pytest.raises(InvalidArgument, match="256 bytes"):
        LIMITS.check_labels({"k": "v" * 256})
    assert LIMITS.page_size(0) == 50 and LIMITS.page_size(MAX_PAGE_SIZE) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument, match=f"page_size is at most {MAX_PAGE_SIZE}"):
        LIMITS.page_size(MAX_PAGE_SIZE + 1)


# ---------------------------------------------------------------------------------------------- on the wire
WIRE_REFUSALS = {
    "max_tokens zero": generation_settings(max_tokens=0),
    "max_tokens over the limit": generation_settings(max_tokens=MAX_NEW_TOKENS + 1),
    "top_p zero": generation_settings(top_p=0.0),
    "top_p over one": generation_settings(top_p=2.0),
    "negative temperature": generation_settings(temperature=-1.0),
    "nan temperature": generation_settings(temperature=math.nan),
    "zero repetition penalty": generation_settings(repetition_penalty=0.0),
    "seed of 2^64-1": generation_settings(seed=2**64 - 1),
    "empty stop string": generation_settings(stop=[""]),
    "17 stop strings": generation_settings(stop=[str(i) for i in range(17)]),
}


async def invalid(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details()
    return caught.value


async def send(gw, metadata, session_id: str, text: str, settings: pb.GenerationSettings | None = None) -> list:
    call = gw.stub.SendMessage(pb.SendMessageRequest(session_id=session_id, text=text, settings=settings),
                               metadata=metadata, timeout=10)
    return [event async for event in call]


async def test_every_refused_setting_is_invalid_argument_on_the_wire(gw):
    metadata = await gw.tenant("acme")
    created = await gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10)
    sid = created.session.session_id
    for name, settings in WIRE_REFUSALS.items():
        err = await invalid(send(gw, metadata, sid, "hi", settings))
        assert "internal" not in err.details().lower(), name
        err = await invalid(gw.stub.CreateSession(pb.CreateSessionRequest(default_settings=settings),
                                                  metadata=metadata, timeout=10))
    assert gw.backend.chats == []  # nothing reached a replica
    page = await gw.stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10)
    assert [s.session_id for s in page.sessions] == [sid]  # the refused creates left nothing
    assert not await gw.store.sessions.is_busy(sid)  # and no turn lock


async def test_refused_requests_on_the_wire(gw):
    metadata = await gw.tenant("acme")
    sid = (await gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10)).session.session_id
    err = await invalid(send(gw, metadata, sid, "   "))
    assert err.details() == "text is empty"
    err = await invalid(send(gw, metadata, sid, "x" * 1025))
    assert "1025 bytes" in err.details()
    await invalid(send(gw, metadata, "", "hi"))
    await invalid(gw.stub.CreateSession(pb.CreateSessionRequest(system_prompt="y" * 1025), metadata=metadata,
                                        timeout=10))
    await invalid(gw.stub.CreateSession(pb.CreateSessionRequest(labels={f"k{i}": "v" for i in range(33)}),
                                        metadata=metadata, timeout=10))
    await invalid(gw.stub.GetSession(pb.GetSessionRequest(session_id=""), metadata=metadata, timeout=10))
    await invalid(gw.stub.DeleteSession(pb.DeleteSessionRequest(session_id=""), metadata=metadata, timeout=10))
    err = await invalid(gw.stub.ListSessions(pb.ListSessionsRequest(page_token="garbage"), metadata=metadata,
                                             timeout=10))
    assert "page_token" in err.details()
    await invalid(gw.stub.ListSessions(pb.ListSessionsRequest(page_size=100_000), metadata=metadata, timeout=10))
    assert gw.backend.chats == [] and gw.backend.created == [sid]


def test_top_k_is_capped_at_the_gateway_and_request_ids_have_one_form():
    assert LIMITS.turn_params({}, {"top_k": 65_536}).top_k == 65_536
    for fields in ({"top_k": 65_537}, {"top_k": 2**32 - 1}):
        with pytest.raises(InvalidArgument, match="top_k must be between 0 and 65536"):
            LIMITS.turn_params({}, fields)
        with pytest.raises(InvalidArgument, match="top_k"):
            LIMITS.session_defaults(fields)
    with pytest.raises(InvalidArgument, match="top_k"):
        LIMITS.turn_params({"top_k": 2**32 - 1}, {})  # a stored default is judged too
    assert LIMITS.check_request_id("") == "" and LIMITS.check_request_id("retry-7:abc") == "retry-7:abc"
    for bad in ("has space", "x" * 129, "tab\t", "é"):
        with pytest.raises(InvalidArgument, match="request_id"):
            LIMITS.check_request_id(bad)


async def test_malformed_session_ids_are_not_found_before_any_store_access(gw):
    """Ids that would name another key of the session (`<sid>:tx`, `<sid>:lease`) or cannot be one: the NOT_FOUND
    of an unknown session on every RPC, never the store's WRONGTYPE as UNAVAILABLE."""
    metadata = await gw.tenant("acme")
    sid = (await gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10)).session.session_id
    await send(gw, metadata, sid, "hi")  # the transcript, lease and lock keys exist now
    await gw.store.redis.set(gw.store.keys.lease(sid), "1|r-1")
    for bad in (*key_named_ids(gw.store.keys, sid), sid.upper(), "s" * 129, "x" * 5000, "nope"):
        for call in (
            gw.stub.GetSession(pb.GetSessionRequest(session_id=bad), metadata=metadata, timeout=10),
            gw.stub.DeleteSession(pb.DeleteSessionRequest(session_id=bad), metadata=metadata, timeout=10),
            send(gw, metadata, bad, "hi"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (bad, caught.value.details())
            assert caught.value.details().startswith("session '") and caught.value.details().endswith("' not found")
    assert len(gw.backend.chats) == 1 and gw.backend.deleted == []
    assert (await gw.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)).turns == 0


async def test_top_k_beyond_the_gateway_cap_is_refused_on_the_wire(gw):
    metadata = await gw.tenant("acme")
    sid = (await gw.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10)).session.session_id
    err = await invalid(send(gw, metadata, sid, "hi", generation_settings(top_k=2**32 - 1)))
    assert "top_k" in err.details()
    await invalid(gw.stub.CreateSession(pb.CreateSessionRequest(default_settings=generation_settings(top_k=2**32 - 1)),
                                        metadata=metadata, timeout=10))
    err = await invalid(gw.stub.SendMessage(pb.SendMessageRequest(session_id=sid, text="hi", request_id="a b"),
                                            metadata=metadata, timeout=10).read())
    assert "request_id" in err.details()
    assert gw.backend.chats == []


async def test_stored_defaults_that_the_turn_overrides_are_judged_together(gw):
    metadata = await gw.tenant("acme")
    created = await gw.stub.CreateSession(
        pb.CreateSessionRequest(default_settings=generation_settings(max_tokens=400, temperature=0.5)),
        metadata=metadata, timeout=10)
    sid = created.session.session_id
    assert settings_to_fields(created.session.default_settings) == {"max_tokens": 400, "temperature": 0.5}
    await send(gw, metadata, sid, "hi", generation_settings(max_tokens=3))
    params = gw.backend.chats[-1].params
    assert (params.max_tokens, params.temperature) == (3, 0.5)
    await send(gw, metadata, sid, "hi")
    assert gw.backend.chats[-1].params.max_tokens == 400
    await invalid(send(gw, metadata, sid, "hi", generation_settings(top_p=0.0)))
