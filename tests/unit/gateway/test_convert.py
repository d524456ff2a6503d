"""pb <-> protocol conversion: presence, round trips, events, sessions, finish reasons, page cursors."""

from __future__ import annotations

import base64

import pytest

from sinkserve.errors import InvalidArgument
from sinkserve.gateway import convert
from sinkserve.protocol import FINISH_REASONS, GenerationParams, SessionView, TurnDelta, TurnFinished
from sinkserve.store import SessionRecord
from sinkserve.v1 import sinkserve_pb2 as pb


def record(**fields) -> SessionRecord:
    base = dict(session_id="s1", tenant="acme", system_prompt="Be brief.", defaults={}, labels={"team": "a"},
                created_ms=1_700_000_000_000, turns=3, tokens_seen=40, owner="r-1", epoch=2,
                member="1700000000000|s1")
    return SessionRecord(**{**base, **fields})


# ---------------------------------------------------------------------------------------------- settings
def test_unset_fields_are_absent_and_set_zeros_are_present():
    assert convert.settings_to_fields(pb.GenerationSettings()) == {}
    assert convert.settings_to_fields(None) == {}
    zeros = pb.GenerationSettings(max_tokens=0, temperature=0.0, top_k=0, top_p=0.0, repetition_penalty=0.0, seed=0)
    assert convert.settings_to_fields(zeros) == dict(max_tokens=0, temperature=0.0, top_k=0, top_p=0.0,
                                                     repetition_penalty=0.0, seed=0)


def test_every_wire_field_is_a_generation_params_field():
    assert set(convert.WIRE_FIELDS) <= set(GenerationParams.field_names())
    assert set(convert.WIRE_FIELDS) == set(pb.GenerationSettings.DESCRIPTOR.fields_by_name)


FULL = dict(max_tokens=64, temperature=0.5, top_k=40, top_p=0.875, repetition_penalty=1.25, seed=2**63 - 1,
            stop=["\n\n", "END"])  # float32-exact floats, so the wire keeps them as they are


@pytest.mark.parametrize("fields", [FULL, {}, {"stop": ["x"]}, {"temperature": 0.0}, {"seed": 0, "top_k": 1}])
def test_fields_round_trip_through_the_wire(fields):
    wire = convert.fields_to_settings(fields)
    assert convert.settings_to_fields(pb.GenerationSettings.FromString(wire.SerializeToString())) == fields


def test_fields_the_wire_has_no_place_for_are_left_out():
    wire = convert.fields_to_settings({"max_tokens": 5, "ignore_eos": True, "seed": None, "stop": ("a",)})
    assert convert.settings_to_fields(wire) == {"max_tokens": 5, "stop": ["a"]}


def test_wire_settings_become_generation_params_and_back():
    params = GenerationParams.from_fields(convert.settings_to_fields(convert.fields_to_settings(FULL)))
    assert params.stop == ("\n\n", "END") and params.top_p == 0.875
    back = {k: v for k, v in params.as_fields().items() if k in convert.WIRE_FIELDS}
    assert back == FULL


# ---------------------------------------------------------------------------------------------- turn events
def test_a_delta_is_one_wire_delta():
    assert list(convert.turn_event_to_pb(TurnDelta("Hello", 2))) == [pb.SendMessageEvent(delta=pb.TextDelta(text="Hello"))]
    assert list(convert.turn_event_to_pb(TurnDelta("", 1))) == []


def test_finished_sends_held_back_text_first_then_usage():
    finished = TurnFinished("stop", prompt_tokens=11, completion_tokens=4, turn=3, replica="r-1", cache_entries=32,
                            text="tail")
    events = list(convert.turn_event_to_pb(finished))
    assert events[0] == pb.SendMessageEvent(delta=pb.TextDelta(text="tail"))
    done = events[1].finished
    assert done.finish_reason == pb.FINISH_REASON_STOP
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (11, 4, 15)
    assert (done.turn, done.replica, done.cache_entries) == (3, "r-1", 32)
    assert len(list(convert.turn_event_to_pb(TurnFinished("eos", 1, 1, 1, "r", 2)))) == 1


def test_not_an_event_is_refused():
    with pytest.raises(TypeError):
        list(convert.turn_event_to_pb({"delta": "x"}))


@pytest.mark.parametrize("reason", FINISH_REASONS)
def test_finish_reasons_round_trip(reason):
    value = convert.finish_reason_to_pb(reason)
    assert value != pb.FINISH_REASON_UNSPECIFIED
    assert convert.finish_reason_from_pb(value) == reason


def test_an_unknown_finish_reason_is_unspecified():
    assert convert.finish_reason_to_pb("melted") == pb.FINISH_REASON_UNSPECIFIED
    assert convert.finish_reason_from_pb(pb.FINISH_REASON_UNSPECIFIED) is None
    assert set(convert.FINISH_REASONS.values()) == set(pb.FinishReason.values()) - {pb.FINISH_REASON_UNSPECIFIED}


# ---------------------------------------------------------------------------------------------- sessions
def test_a_session_from_its_record_and_the_replicas_view():
    view = SessionView("s1", "r-1", resident=True, busy=True, cache_entries=30, cache_capacity=32, tokens_seen=55)
    session = convert.session_to_pb(record(defaults={"max_tokens": 9, "stop": ["x"]}), view)
    assert (session.session_id, session.turns, session.owner_replica) == ("s1", 3, "r-1")
    assert (session.cache_entries, session.cache_capacity, session.busy) == (30, 32, True)
    assert session.tokens_seen == 55  # the replica may have seen tokens the registry has not recorded yet
    assert session.created_unix_ms == 1_700_000_000_000
    assert dict(session.labels) == {"team": "a"} and session.system_prompt == "Be brief."
    assert convert.settings_to_fields(session.default_settings) == {"max_tokens": 9, "stop": ["x"]}


def test_a_session_without_a_view_has_registry_fields_only():
    session = convert.session_to_pb(record(owner=""))
    assert (session.cache_entries, session.cache_capacity, session.busy, session.tokens_seen) == (0, 0, False, 40)
    assert session.owner_replica == ""
    assert convert.session_to_pb(record(), None, busy=True).busy


# ---------------------------------------------------------------------------------------------- cursors
@pytest.mark.parametrize("member", ["1700000000000|s1", "0000000000001|a|b", "1|ü"])
def test_cursors_round_trip(member):
    token = convert.encode_cursor(member)
    assert "|" not in token
    assert convert.decode_cursor(token) == member


def test_first_and_last_pages():
    assert convert.encode_cursor("") == ""
    assert convert.decode_cursor("") == ""


@pytest.mark.parametrize("token", ["garbage", "!!!", base64.urlsafe_b64encode(b"\xff\xfe|").decode(),
                                   base64.urlsafe_b64encode(b"no-bar").decode()])
def test_a_bad_cursor_is_invalid_argument(token):
    with pytest.raises(InvalidArgument) as caught:
        convert.decode_cursor(token)
    assert "page_token" in caught.value.message
