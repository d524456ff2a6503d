"""The OpenAI-compatible HTTP API through the real `openai` Python SDK against the local stack (real redis-server,
real local Ray with 2 replicas, the gateway's HTTP front end, tiny model): Responses chains, the streaming event
sequence, Conversations, chat completions bound by x-session-id, errors, and a disconnect stopping generation."""

from __future__ import annotations

import time

import openai
import pytest

from sinkserve.errors import SessionNotFound

from .conftest import SINKS, WINDOW

CAPACITY = SINKS + WINDOW

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]


def sdk(stack, api_key: str) -> openai.OpenAI:
    # No retries: a 429 must reach the test, not be waited out by the SDK.
    return openai.OpenAI(base_url=stack.http_url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def session_record(stack, sid: str):
    return stack.loop.run(stack.store.sessions.get_session(sid))


def record_owner(stack, sid: str) -> str:
    return session_record(stack, sid).owner


def transcript(stack, sid: str):
    return stack.loop.run(stack.store.sessions.transcript(sid))


def wait_idle(stack, sid: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while stack.loop.run(stack.store.sessions.is_busy(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stack.loop.run(stack.store.sessions.is_busy(sid)), "the turn never ended"


def test_responses_chained_by_previous_response_id_hold_one_session(stack):
    client = sdk(stack, stack.tenant("http-chain"))
    first = client.responses.create(input="Hello there.", instructions="You are terse.", max_output_tokens=6)
    assert first.status in ("completed", "incomplete") and first.output_text
    sid = first.model_extra["sinkserve"]["session_id"]
    responses, total = [first], first.usage.total_tokens
    for i in range(4):
        previous = responses[-1]
        reply = client.responses.create(input=f"Turn {i + 2}: go on.", previous_response_id=previous.id,
                                        max_output_tokens=6)
        assert reply.previous_response_id == previous.id
        extra = reply.model_extra["sinkserve"]
        assert (extra["session_id"], extra["turn"]) == (sid, i + 2)
        assert extra["replica"] == record_owner(stack, sid) and 0 < extra["cache_entries"] <= CAPACITY
        assert reply.usage.output_tokens >= 1
        responses.append(reply)
        total += reply.usage.total_tokens
    record = session_record(stack, sid)
    assert record.turns == 5  # every turn went into the one session
    entries = transcript(stack, sid)
    assert len(entries) == 5
    # Every id the session took in, each once. (Usage is per turn in OpenAI's terms and does not add up to it
    # exactly: ids a turn queues for the next one, its last sampled token and the template's close, are fed
    # with the next message.)
    assert record.tokens_seen == sum(len(e) for e in entries) > total / 2
    # Stored responses come back by id, with the same text.
    again = client.responses.retrieve(responses[2].id)
    assert again.id == responses[2].id and again.output_text == responses[2].output_text


def test_responses_streaming_event_sequence(stack):
    client = sdk(stack, stack.tenant("http-stream"))
    events = list(client.responses.create(input="Tell me a story.", max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    deltas = [i for i, k in enumerate(kinds) if k == "response.output_text.delta"]
    assert deltas, kinds
    head = kinds[:deltas[0]]
    assert head == ["response.created", "response.in_progress", "response.output_item.added",
                    "response.content_part.added"]
    final = events[-1].response
    # max_output_tokens reached: incomplete (OpenAI's word for it); an end of its own: completed
    terminal = "response.incomplete" if final.incomplete_details else "response.completed"
    if final.incomplete_details:
        assert final.incomplete_details.reason == "max_output_tokens" and final.usage.output_tokens == 8
    assert kinds[deltas[-1] + 1:] == ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done", terminal]
    assert final.status == terminal.removeprefix("response.")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(events[i].delta for i in deltas)
    assert final.output_text == text == events[deltas[-1] + 1].text
    assert final.id == events[0].response.id
    assert events[0].response.status == "in_progress"


def test_conversations_create_get_delete_and_respond_in_one(stack):
    client = sdk(stack, stack.tenant("http-conv"))
    conv = client.conversations.create(metadata={"topic": "sea"},
                                       items=[{"type": "message", "role": "system", "content": "Be brief."}])
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "sea"}
    for i in range(2):
        reply = client.responses.create(input=f"message {i}", conversation=conv.id, max_output_tokens=4)
        assert reply.conversation.id == conv.id
    got = client.conversations.retrieve(conv.id)
    info = got.model_extra["sinkserve"]
    assert info["turns"] == 2 and info["tokens_seen"] > 0
    assert 0 < info["cache_entries"] <= info["cache_capacity"]
    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="still there?", conversation=conv.id)


def test_chat_completions_bound_by_session_header(stack, client_factory):
    key = stack.tenant("http-chat")
    client = sdk(stack, key)
    handle = {"x-session-id": "my-chat-1"}
    messages = [{"role": "system", "content": "You are a helper."}, {"role": "user", "content": "First question."}]
    raw = client.chat.completions.with_raw_response.create(model="any", messages=messages, max_tokens=5,
                                                           extra_headers=handle)
    first = raw.parse()
    assert raw.headers["x-sinkserve-session-mode"] == "created"
    sid = raw.headers["x-sinkserve-session-id"]
    assert first.choices[0].message.content and first.usage.completion_tokens >= 1

    # The same history plus one new user message: only that message is ingested.
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Second question, please."}]
    raw = client.chat.completions.with_raw_response.create(model="any", messages=messages, max_tokens=5,
                                                           extra_headers=handle)
    second = raw.parse()
    assert raw.headers["x-sinkserve-session-mode"] == "continued"
    assert raw.headers["x-sinkserve-session-id"] == sid
    # Reference: a gRPC session's second turn with the same message ingests the same prompt tokens.
    grpc_client = client_factory(key)
    ref = grpc_client.create_session(system_prompt="You are a helper.")
    grpc_client.chat(ref.session_id, "First question.", max_tokens=5)
    _, ref_final = grpc_client.chat(ref.session_id, "Second question, please.", max_tokens=5)
    assert second.usage.prompt_tokens == ref_final.usage.prompt_tokens
    assert second.usage.prompt_tokens < first.usage.prompt_tokens + first.usage.completion_tokens
    assert session_record(stack, sid).turns == 2

    # Streaming with usage, continuing again.
    messages += [{"role": "assistant", "content": second.choices[0].message.content},
                 {"role": "user", "content": "Third."}]
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, extra_headers=handle))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    assert session_record(stack, sid).turns == 3

    # A divergent history (an earlier user message changed): the session is rebuilt from the messages.
    diverged = [dict(m) for m in messages]
    diverged[1]["content"] = "A different first question."
    raw = client.chat.completions.with_raw_response.create(model="any", messages=diverged, max_tokens=5,
                                                           extra_headers=handle)
    raw.parse()
    assert raw.headers["x-sinkserve-session-mode"] == "rebuilt"
    rebuilt = raw.headers["x-sinkserve-session-id"]
    assert rebuilt != sid and session_record(stack, rebuilt).turns == 1
    with pytest.raises(SessionNotFound):  # the old session is gone
        session_record(stack, sid)

    # Without the header: a one-off session, closed after the reply.
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "user", "content": "Just once."}], max_tokens=4)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-sinkserve-session-mode"] == "one-off"
    with pytest.raises(SessionNotFound):
        session_record(stack, raw.headers["x-sinkserve-session-id"])

    with pytest.raises(openai.BadRequestError) as err:  # n > 1 refused clearly
        client.chat.completions.create(model="any", messages=messages, n=2)
    assert "n must be 1" in str(err.value)


def test_wrong_key_other_tenant_and_quota(stack):
    with pytest.raises(openai.AuthenticationError):
        sdk(stack, "sk-not-a-key").models.list()
    owner = sdk(stack, stack.tenant("http-owner"))
    conv = owner.conversations.create()
    assert [m.id for m in owner.models.list()]
    stranger = sdk(stack, stack.tenant("http-stranger"))
    with pytest.raises(openai.NotFoundError):
        stranger.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(input="hi", conversation=conv.id)
    assert session_record(stack, conv.id.removeprefix("conv_")).turns == 0

    limited = sdk(stack, stack.tenant("http-limited", requests_per_second=0.01, request_burst=1))
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as err:
        limited.models.list()
    assert err.value.status_code == 429
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_client_disconnect_stops_generation(stack):
    client = sdk(stack, stack.tenant("http-cut"))
    conv = client.conversations.create()
    sid = conv.id.removeprefix("conv_")
    stream = client.responses.create(input="Write an endless story.", conversation=conv.id,
                                     max_output_tokens=90_000, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()  # hang up mid-reply
    # The gateway drops the turn lock as soon as it cancels; the replica records the cut turn when it stops.
    deadline = time.monotonic() + 30
    while stack.loop.run(stack.store.sessions.last_turn(sid)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    wait_idle(stack, sid)
    record = session_record(stack, sid)
    entries = transcript(stack, sid)
    assert record.turns == 1 and len(entries) == 1
    last = stack.loop.run(stack.store.sessions.last_turn(sid))
    assert last.finish_reason == "aborted"  # recorded as cut
    assert last.completion_tokens < 90_000
    seen = record.tokens_seen
    time.sleep(0.5)
    assert session_record(stack, sid).tokens_seen == seen, "generation went on after the client hung up"
    reply = client.responses.create(input="Short now.", conversation=conv.id, max_output_tokens=3)
    assert reply.model_extra["sinkserve"]["turn"] == 2
