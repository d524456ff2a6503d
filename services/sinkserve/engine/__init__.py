"""The StreamingLLM engine: pure torch, no Ray, no Redis."""

from sinkserve.engine.engine import Engine, load_engine
from sinkserve.engine.types import (
    ContextOverflow,
    EngineError,
    InvalidRequest,
    NoFreeSlot,
    SamplingParams,
    SessionBusy,
    SessionInfo,
    SessionNotFound,
    TokenOutput,
    UnsupportedModel,
)

__all__ = [
    "ContextOverflow",
    "Engine",
    "EngineError",
    "InvalidRequest",
    "NoFreeSlot",
    "SamplingParams",
    "SessionBusy",
    "SessionInfo",
    "SessionNotFound",
    "TokenOutput",
    "UnsupportedModel",
    "load_engine",
]
