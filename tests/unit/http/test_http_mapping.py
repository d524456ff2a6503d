"""The HTTP front end's pure mapping: OpenAI request JSON -> GenerationParams fields, chat messages -> session
turns, and the one error table from sinkserve.errors statuses to HTTP answers."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_exc

from sinkserve import errors
from sinkserve.config import GatewayConfig
from sinkserve.gateway.limits import Limits
from sinkserve.http import mapping
from sinkserve.http.errors import TABLE, answer_for


def params(fields):
    return Limits(GatewayConfig(max_new_tokens=500)).turn_params({}, fields)


def test_chat_fields_become_generation_params():
    fields = mapping.chat_fields({"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "END",
                                  "n": 1, "model": "x"})
    assert fields == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["END"]}
    p = params(fields)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (7, 0.5, 0.9, 3, ("END",))


def test_max_completion_tokens_wins_over_max_tokens():
    assert mapping.chat_fields({"max_tokens": 7, "max_completion_tokens": 9}) == {"max_tokens": 9}


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"max_tokens": "5"}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
    ({"stop": [1]}, "stop"), ({"seed": 1.5}, "seed"),
])
def test_bad_chat_fields_are_bad_requests_naming_the_param(body, param):
    with pytest.raises(mapping.BadRequest) as caught:
        mapping.chat_fields(body)
    assert caught.value.param == param
    assert answer_for(caught.value).http_status == 400
    assert answer_for(caught.value).body["error"]["param"] == param


def test_out_of_range_values_are_refused_by_generation_params():
    for fields in ({"max_tokens": 501}, {"top_p": 0.0}, {"temperature": -1}):
        with pytest.raises(errors.InvalidArgument):
            params(mapping.chat_fields(fields))


def test_responses_fields():
    assert mapping.responses_fields({"max_output_tokens": 5, "temperature": 0, "top_p": 1}) == {
        "max_tokens": 5, "temperature": 0, "top_p": 1}


def test_messages_continue_a_session_only_when_they_extend_what_it_holds():
    first = [("system", "be kind"), ("user", "hi")]
    held = [mapping.message_digest(r, t) for r, t in first] + [mapping.message_digest("assistant", "hello")]
    more = first + [("assistant", "hello"), ("user", "how are you?"), ("user", "and?")]
    assert mapping.new_user_text(held, more) == "how are you?\n\nand?"
    assert mapping.new_user_text(held, first + [("assistant", "HELLO"), ("user", "x")]) is None  # diverges
    assert mapping.new_user_text(held, first) is None  # nothing new
    assert mapping.new_user_text([], [("user", "x")]) == "x"


def test_a_rebuild_puts_the_history_in_the_system_prompt_and_the_last_user_messages_in_the_turn():
    system, text = mapping.rebuild_plan([("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")])
    assert text == "c"
    assert system.startswith("S\n\n") and "user: a\nassistant: b" in system
    assert mapping.rebuild_plan([("user", "only")]) == ("", "only")


def test_chat_messages_shape():
    assert mapping.chat_messages({"messages": [{"role": "developer", "content": "d"},
                                               {"role": "user", "content": [{"type": "text", "text": "x"}]}]}) == [
        ("system", "d"), ("user", "x")]
    for body in ({}, {"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}):
        with pytest.raises(mapping.BadRequest):
            mapping.chat_messages(body)


def test_responses_input():
    assert mapping.responses_input({"input": "hi"}) == "hi"
    assert mapping.responses_input({"input": [{"role": "user", "content": "a"},
                                              {"type": "input_text", "text": "b"}]}) == "a\n\nb"
    with pytest.raises(mapping.BadRequest):
        mapping.responses_input({"input": [{"role": "assistant", "content": "a"}]})


def test_every_status_has_an_http_answer():
    assert set(TABLE) == set(errors.Status)


@pytest.mark.parametrize("exc, status", [
    (errors.InvalidArgument("x"), 400), (errors.Unauthenticated("x"), 401), (errors.SessionNotFound("x"), 404),
    (errors.TenantSessionLimit("x"), 429), (errors.SessionBusy("x"), 409), (errors.ReplicaUnavailable("x"), 503),
    (errors.NotOwner("x"), 503), (errors.Internal("x"), 500), (RuntimeError("secret"), 500),
    (redis_exc.ConnectionError("down"), 503), (errors.DeadlineExceeded("x"), 504),
])
def test_error_table(exc, status):
    answer = answer_for(exc)
    assert answer.http_status == status
    assert set(answer.body["error"]) == {"message", "type", "param", "code"}
    assert "secret" not in answer.body["error"]["message"]


def test_a_retry_hint_is_a_retry_after_header_in_whole_seconds():
    answer = answer_for(errors.ResourceExhausted("slow down", retry_after_s=1.2))
    assert answer.http_status == 429 and answer.headers == {"retry-after": "2"}
    assert answer_for(errors.InvalidArgument("x")).headers == {}
