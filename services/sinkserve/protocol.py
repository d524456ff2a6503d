"""The typed values the layers pass to each other: settings of a turn, the events of a turn, a session's view.

No torch, Ray, Redis or gRPC here: the engine, the replica, the CLI and every front end (gRPC, HTTP) import it.
`GenerationParams` is the one place where generation settings are validated; a front end converts its wire
message into a field mapping and calls `GenerationParams.from_fields`, the engine takes the result as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

from sinkserve.errors import InvalidArgument

FinishReason = Literal["eos", "length", "stop", "aborted"]
FINISH_REASONS: tuple[FinishReason, ...] = ("eos", "length", "stop", "aborted")

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 1024
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping settings of one turn; invalid values never construct."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; applied over the tokens in the session's cache
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidArgument("temperature must be a finite number >= 0")
        _check_int("top_k", self.top_k, low=0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("top_p must be in (0, 1]")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidArgument("repetition_penalty must be a finite number > 0")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or sum(len(s.encode()) for s in self.stop) > MAX_STOP_BYTES:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_BYTES} bytes in all")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidArgument("ignore_eos must be a boolean")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_fields(
        cls,
        values: Mapping[str, Any],
        *,
        max_tokens_limit: int | None = None,
        default_max_tokens: int | None = None,
    ) -> "GenerationParams":
        """Settings from a mapping of the fields a client set (unknown names refused). `max_tokens_limit` is the
        deployment's upper bound; `default_max_tokens` applies when the mapping has no max_tokens."""
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise InvalidArgument(f"unknown generation settings: {', '.join(sorted(unknown))}")
        given = dict(values)
        if "max_tokens" not in given and default_max_tokens is not None:
            given["max_tokens"] = default_max_tokens
        params = cls(**given)
        if max_tokens_limit is not None and params.max_tokens > max_tokens_limit:
            raise InvalidArgument(f"max_tokens must be between 1 and {max_tokens_limit}")
        return params

    @classmethod
    def check_fields(cls, values: Mapping[str, Any], *, max_tokens_limit: int | None = None) -> dict[str, Any]:
        """Validate a partial mapping (a session's stored defaults) and return it normalised, still partial."""
        cls.from_fields(values, max_tokens_limit=max_tokens_limit)
        out = dict(values)
        if "stop" in out:
            out["stop"] = list(out["stop"])
        return out

    def as_fields(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidArgument(f"{name} must be {bounds}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number")


@dataclass(frozen=True)
class TurnDelta:
    """Text a turn produced since its previous event (one engine step, or several coalesced)."""

    text: str
    tokens: int = 1


@dataclass(frozen=True)
class TurnFinished:
    """The last event of a turn, sent only once the turn is in the transcript."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    turn: int  # the session's turn count after this one
    replica: str
    cache_entries: int
    text: str = ""  # text held back until the end (a stop-string prefix that turned out not to be one)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TurnProgress:
    """A turn is alive but has no text yet (a long message is still being ingested, or it waits for a slot):
    sent every few seconds so a front end can bound the wait for a dead replica without cutting slow work."""

    waited_s: float


TurnEvent = TurnDelta | TurnFinished | TurnProgress


@dataclass(frozen=True)
class SessionView:
    """A replica's view of one session: where its cache is and how full."""

    session_id: str
    replica: str
    resident: bool = False  # its cache is in a KV slot
    parked: bool = False  # its cache waits in host memory
    busy: bool = False  # a turn is running
    cache_entries: int = 0
    cache_capacity: int = 0
    tokens_seen: int = 0
    turns: int = 0
