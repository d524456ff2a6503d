"""Pure mapping between OpenAI request/response JSON and the typed protocol: no I/O.

Chat messages become a system prompt and user turns; sampling fields become ``GenerationParams`` field names
(validated by ``Limits.turn_params`` / ``GenerationParams``); finish reasons and usage go back in OpenAI's words.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from sinkserve.errors import InvalidArgument

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "stop"}


class BadRequest(InvalidArgument):
    """An invalid request field; `param` names it (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(body: Mapping[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadRequest(f"{name} must be a number", name)
    return value


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{name} must be an integer", name)
    return value


def chat_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """GenerationParams fields of a /v1/chat/completions body (only those it set)."""
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise BadRequest("n must be 1: sinkserve generates one choice per session turn", "n")
    fields: dict[str, Any] = {}
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            fields[name] = value
    seed = _integer(body, "seed")
    if seed is not None:
        fields["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings", "stop")
        if stop:
            fields["stop"] = stop
    return fields


def responses_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """GenerationParams fields of a /v1/responses body."""
    fields: dict[str, Any] = {}
    max_tokens = _integer(body, "max_output_tokens")
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            fields[name] = value
    return fields


def content_text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise BadRequest("only text content is supported", param)
        return "".join(parts)
    raise BadRequest("content must be a string or a list of text parts", param)


def chat_messages(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of each message; roles system/developer, user, assistant."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest("each message is an object", f"messages[{i}]")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadRequest("role must be system, developer, user or assistant", f"messages[{i}].role")
        out.append((role, content_text(message.get("content"), f"messages[{i}].content")))
    if out[-1][0] != "user":
        raise BadRequest("the last message must be from the user", "messages")
    return out


def message_digest(role: str, text: str) -> str:
    return hashlib.sha256(json.dumps([role, text]).encode()).hexdigest()[:32]


def split_system(messages: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The leading system messages as one system prompt, and the rest."""
    system = []
    i = 0
    while i < len(messages) and messages[i][0] == "system":
        system.append(messages[i][1])
        i += 1
    return "\n\n".join(system), messages[i:]


def new_user_text(held: list[str], messages: list[tuple[str, str]]) -> str | None:
    """The text to ingest when `messages` continue a session holding the message digests `held`: the user
    messages after them joined by a blank line; None when the messages diverge (or add nothing but users')."""
    digests = [message_digest(r, t) for r, t in messages]
    if len(digests) <= len(held) or digests[:len(held)] != held:
        return None
    extra = messages[len(held):]
    if any(role != "user" for role, _ in extra):
        return None
    return "\n\n".join(text for _, text in extra)


def rebuild_plan(messages: list[tuple[str, str]]) -> tuple[str, str]:
    """(system prompt, first turn's text) of a session rebuilt from a whole message list. The engine ingests a
    conversation turn by turn (a user message, then its own reply), so the history before the last user messages
    goes into the system prompt as a transcript; the trailing user messages are the turn."""
    system, rest = split_system(messages)
    j = len(rest)
    while j > 0 and rest[j - 1][0] == "user":
        j -= 1
    history, tail = rest[:j], rest[j:]
    if history:
        lines = "\n".join(f"{role}: {text}" for role, text in history)
        system = (system + "\n\n" if system else "") + "The conversation so far:\n" + lines
    return system, "\n\n".join(text for _, text in tail)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def responses_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def responses_input(body: Mapping[str, Any]) -> str:
    """The user text of a /v1/responses `input`: a string, or a list of user messages / input_text parts."""
    given = body.get("input")
    if isinstance(given, str):
        if not given.strip():
            raise BadRequest("input is empty", "input")
        return given
    if isinstance(given, list) and given:
        texts = []
        for i, item in enumerate(given):
            if isinstance(item, Mapping) and item.get("type") in (None, "message"):
                if item.get("role", "user") not in ("user",):
                    raise BadRequest("only user messages may be given as input", f"input[{i}].role")
                texts.append(content_text(item.get("content"), f"input[{i}].content"))
            elif isinstance(item, Mapping) and item.get("type") == "input_text":
                texts.append(content_text([item], f"input[{i}]"))
            else:
                raise BadRequest("input items are user messages or input_text parts", f"input[{i}]")
        return "\n\n".join(texts)
    raise BadRequest("input must be a string or a non-empty list", "input")
