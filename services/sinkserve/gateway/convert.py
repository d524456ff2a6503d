"""pb <-> protocol: every conversion between the wire messages and the typed values the layers pass.

Shape only: which fields a client set, how an event or a session looks on the wire, how a page cursor is spelled.
Whether a setting is valid is `GenerationParams`' to say; the gateway's own limits are in ``limits.py``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Iterator, Mapping

from sinkserve.errors import InvalidArgument
from sinkserve.protocol import FinishReason, SessionView, TurnDelta, TurnEvent, TurnFinished
from sinkserve.store import SessionRecord, TurnRecord
from sinkserve.v1 import sinkserve_pb2 as pb

# GenerationSettings fields with proto3 `optional` presence, and the repeated one. Their names are
# GenerationParams field names.
OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
REPEATED_FIELDS = ("stop",)
WIRE_FIELDS = OPTIONAL_FIELDS + REPEATED_FIELDS

FINISH_REASONS: dict[FinishReason, int] = {
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "aborted": pb.FINISH_REASON_ABORTED,
}
_FINISH_REASONS_BACK = {value: name for name, value in FINISH_REASONS.items()}


# ---------------------------------------------------------------------------------------------- settings
def settings_to_fields(settings: pb.GenerationSettings | None) -> dict[str, Any]:
    """The fields the client set (proto3 optional presence; `stop` when non-empty), by GenerationParams name."""
    out: dict[str, Any] = {}
    if settings is None:
        return out
    for name in OPTIONAL_FIELDS:
        if settings.HasField(name):
            out[name] = getattr(settings, name)
    if settings.stop:
        out["stop"] = list(settings.stop)
    return out


def fields_to_settings(values: Mapping[str, Any]) -> pb.GenerationSettings:
    """A field mapping (a session's stored defaults) on the wire; fields the wire has no place for are left out."""
    wire = {name: values[name] for name in WIRE_FIELDS if name in values and values[name] is not None}
    if "stop" in wire:
        wire["stop"] = list(wire["stop"])
    return pb.GenerationSettings(**wire)


# ---------------------------------------------------------------------------------------------- turns
def finish_reason_to_pb(reason: str) -> int:
    return FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)  # type: ignore[call-overload]


def finish_reason_from_pb(value: int) -> FinishReason | None:
    return _FINISH_REASONS_BACK.get(value)


def turn_event_to_pb(event: TurnEvent) -> Iterator[pb.SendMessageEvent]:
    """The wire events of one turn event: a delta, or (held-back text as a last delta, then) `finished`."""
    if isinstance(event, TurnDelta):
        if event.text:
            yield pb.SendMessageEvent(delta=pb.TextDelta(text=event.text))
        return
    if not isinstance(event, TurnFinished):
        raise TypeError(f"not a turn event: {type(event).__name__}")
    if event.text:
        yield pb.SendMessageEvent(delta=pb.TextDelta(text=event.text))
    yield pb.SendMessageEvent(
        finished=pb.TurnFinished(
            finish_reason=finish_reason_to_pb(event.finish_reason),
            usage=pb.TokenUsage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                total_tokens=event.total_tokens,
            ),
            turn=event.turn,
            replica=event.replica,
            cache_entries=event.cache_entries or 0,
        )
    )


def replay_to_pb(turn: TurnRecord) -> Iterator[pb.SendMessageEvent]:
    """A recorded turn sent again to a retry of its request id: its whole text, then `finished` (replayed)."""
    if turn.text:
        yield pb.SendMessageEvent(delta=pb.TextDelta(text=turn.text))
    yield pb.SendMessageEvent(
        finished=pb.TurnFinished(
            finish_reason=finish_reason_to_pb(turn.finish_reason),
            usage=_usage(turn.prompt_tokens, turn.completion_tokens),
            turn=turn.turn,
            replica=turn.replica,
            replayed=True,
        )
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> pb.TokenUsage:
    return pb.TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def recorded_turn_to_pb(turn: TurnRecord) -> pb.RecordedTurn:
    return pb.RecordedTurn(
        turn=turn.turn,
        text=turn.text,
        finish_reason=finish_reason_to_pb(turn.finish_reason),
        finished=turn.finished,
        usage=_usage(turn.prompt_tokens, turn.completion_tokens),
        request_id=turn.request_id,
        replica=turn.replica,
    )


# ---------------------------------------------------------------------------------------------- sessions
def session_to_pb(record: SessionRecord, view: SessionView | None = None, busy: bool = False,
                  last_turn: TurnRecord | None = None) -> pb.Session:
    """The registry's record, with the owner replica's view of the cache and the last turn when there are."""
    return pb.Session(
        session_id=record.session_id,
        turns=record.turns,
        tokens_seen=max(record.tokens_seen, view.tokens_seen if view else 0),
        cache_entries=view.cache_entries if view else 0,
        cache_capacity=view.cache_capacity if view else 0,
        owner_replica=record.owner,
        created_unix_ms=record.created_ms,
        busy=busy or bool(view and view.busy),
        default_settings=fields_to_settings(record.defaults),
        labels=record.labels,
        system_prompt=record.system_prompt,
        last_turn=recorded_turn_to_pb(last_turn) if last_turn is not None else None,
    )


# ---------------------------------------------------------------------------------------------- pages
def encode_cursor(member: str) -> str:
    """A store cursor (the tenant zset member) as an opaque page token; "" for the last page."""
    return base64.urlsafe_b64encode(member.encode()).decode() if member else ""


def decode_cursor(token: str) -> str:
    """The store cursor inside a page token ("" for the first page)."""
    if not token:
        return ""
    try:
        member = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        member = ""
    if "|" not in member:
        raise InvalidArgument("bad page_token: pass a next_page_token from an earlier ListSessions")
    return member
