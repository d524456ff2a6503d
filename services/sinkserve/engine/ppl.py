"""Long-text perplexity through the cache, as the paper's eval_long_ppl: every token is predicted from
the cache state right before it (chunked feeding gives each token exactly that state)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from sinkserve.engine.engine import Engine
from sinkserve.engine.types import InvalidRequest


@dataclass
class PPLResult:
    ppl: float
    tokens: int
    policy: str
    sinks: int
    window: int
    seconds: float
    max_cache_tokens: int
    model: str
    nlls: list[float] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return {
            "ppl": round(self.ppl, 4),
            "tokens": self.tokens,
            "policy": self.policy,
            "sinks": self.sinks,
            "window": self.window,
            "seconds": round(self.seconds, 3),
            "max_cache_tokens": self.max_cache_tokens,
            "model": self.model,
        }


def evaluate_ppl(engine: Engine, text: str, max_tokens: int, chunk: int | None = None, progress: bool = False) -> PPLResult:
    ids = engine.tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise InvalidRequest("the text has fewer than 2 tokens")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids) - 1, desc=f"ppl {engine.policy}", unit="tok", leave=False)
    started = time.perf_counter()
    try:
        nlls = engine.score(ids, chunk=chunk, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - started
    return PPLResult(
        ppl=math.exp(sum(nlls) / len(nlls)),
        tokens=len(nlls),
        policy=engine.policy,
        sinks=engine.sinks,
        window=engine.window,
        seconds=seconds,
        max_cache_tokens=engine.max_entries_scored,  # measured on the slab after every forward
        model=engine.model_name,
        nlls=nlls,
    )
