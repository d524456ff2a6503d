"""The StreamingLLM engine: pure torch, no Ray, no Redis (see engine.py for its parts)."""

from sinkserve.engine.engine import Engine
from sinkserve.engine.loader import load_engine
from sinkserve.engine.output import TokenOutput

__all__ = ["Engine", "TokenOutput", "load_engine"]
