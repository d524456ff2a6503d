"""Plain data types of the engine's public API (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["eos", "length", "stop", "aborted"]


class EngineError(Exception):
    """Base class of every error the engine raises for bad input or exhausted resources."""


class InvalidRequest(EngineError, ValueError):
    """The request itself is wrong (empty message, bad sampling value, bad cache geometry...)."""


class SessionNotFound(EngineError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class NoFreeSlot(EngineError):
    """Every KV slab slot is taken."""


class SessionBusy(EngineError):
    """The session is still ingesting or replying to a previous message."""


class ContextOverflow(EngineError):
    """The dense policy ran past its capacity (the model's context length)."""


class UnsupportedModel(EngineError):
    pass


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; applied over the tokens in the session's cache
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1")
        if self.temperature < 0:
            raise InvalidRequest("temperature must be >= 0")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty must be > 0")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")


@dataclass
class TokenOutput:
    """One step's result for one session that is generating."""

    session_id: str
    token_id: int | None  # None on the final event of an aborted turn
    text: str  # decoded text delta to stream (held back while it could be the start of a stop string)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # tokens ingested for this turn (message + template + previous turn's close)
    completion_tokens: int = 0
    # On the final event only: every token id this turn added to the session's stream, in order
    # (message, reply, closing template tokens). Appending these to the transcript lets any engine
    # rebuild the session with import_session().
    turn_tokens: list[int] | None = None


@dataclass
class SessionInfo:
    session_id: str
    tokens_seen: int  # every token ever fed to the session (grows without bound)
    cache_entries: int  # KV entries held now (<= sinks + window)
    cache_capacity: int  # sinks + window
    turns: int
    busy: bool  # ingesting or generating
    parked: bool = False
