"""Long-text perplexity through the cache, as the paper's eval_long_ppl: every token is predicted from the
cache state right before it (chunked feeding gives each token exactly that state).

Scoring runs on a scratch slab of its own (`ModelRunner.scratch_slab`): it never takes a serving slot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from sinkserve.engine.runner import ModelRunner
from sinkserve.engine.step_inputs import RowInput
from sinkserve.errors import ContextOverflow, InvalidArgument

# Recompute re-encodes sinks + window for every position: this many positions share one forward.
RECOMPUTE_BATCH = 8


@dataclass
class ScoreResult:
    nll: list[float]  # negative log-likelihood of ids[1:]
    max_entries: int  # the most KV entries any prediction saw (measured on the slab after every forward)


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


@torch.inference_mode()
def stream_logits(runner: ModelRunner, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits [len(ids), vocab] of ids streamed through a fresh scratch slot, `chunk` tokens per forward."""
    slab = runner.scratch_slab(1)
    pieces = [runner.forward([RowInput(0, ids[i : i + chunk], "all")], slab)[0] for i in range(0, len(ids), chunk)]
    return torch.cat(pieces).float()


@torch.inference_mode()
def score(runner: ModelRunner, ids: list[int], chunk: int, progress=None) -> ScoreResult:
    """Negative log-likelihood of ids[1:], each token predicted from the cache state before it."""
    geometry = runner.geometry
    if len(ids) < 2:
        raise InvalidArgument("need at least 2 tokens to score")
    if runner.policy == "dense" and len(ids) > geometry.capacity:
        raise ContextOverflow(
            f"dense policy: {len(ids)} tokens exceed the cache capacity {geometry.capacity} "
            "(the model's context length unless --max-context is given)"
        )
    target = torch.tensor(ids[1:], device=runner.device)
    nll = torch.empty(len(ids) - 1, dtype=torch.float64)
    if runner.policy == "recompute":
        return _score_recompute(runner, ids, target, nll, progress)
    slab = runner.scratch_slab(1)
    max_entries = 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : min(start + chunk, len(ids) - 1)]
        logits = runner.forward([RowInput(0, piece, "all")], slab)[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        tgt = target[start : start + len(piece)]
        nll[start : start + len(piece)] = -logp.gather(1, tgt[:, None])[:, 0].double().cpu()
        max_entries = max(max_entries, slab.entries(0))
        if progress is not None:
            progress(len(piece))
    return ScoreResult(nll.tolist(), max_entries)


def _score_recompute(runner: ModelRunner, ids, target, nll, progress) -> ScoreResult:
    geometry = runner.geometry
    slab = runner.scratch_slab(RECOMPUTE_BATCH)
    max_entries = 0
    positions = list(range(len(ids) - 1))
    for start in range(0, len(positions), RECOMPUTE_BATCH):
        batch_positions = positions[start : start + RECOMPUTE_BATCH]
        rows = []
        for slot, t in enumerate(batch_positions):
            slab.reset(slot)
            context = ids[: t + 1]
            if len(context) > geometry.capacity:
                context = context[: geometry.sinks] + context[len(context) - geometry.window :]
            rows.append(RowInput(slot, context, "last"))
        logits = runner.forward(rows, slab)
        max_entries = max(max_entries, max(len(r.ids) for r in rows))
        for t, row_logits in zip(batch_positions, logits):
            logp = torch.log_softmax(row_logits[-1].float(), dim=-1)
            nll[t] = -float(logp[target[t]])
        if progress is not None:
            progress(len(batch_positions))
    return ScoreResult(nll.tolist(), max_entries)


def evaluate_ppl(engine, text: str, max_tokens: int, chunk: int | None = None, progress: bool = False) -> PPLResult:
    """Perplexity of the first `max_tokens` tokens of `text` under the engine's cache policy and geometry."""
    ids = engine.tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise InvalidArgument("the text has fewer than 2 tokens")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids) - 1, desc=f"ppl {engine.policy}", unit="tok", leave=False)
    started = time.perf_counter()
    try:
        result = engine.score(ids, chunk=chunk, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - started
    return PPLResult(
        ppl=math.exp(sum(result.nll) / len(result.nll)),
        tokens=len(result.nll),
        policy=engine.policy,
        sinks=engine.sinks,
        window=engine.window,
        seconds=seconds,
        max_cache_tokens=result.max_entries,
        model=engine.model_name,
        nlls=result.nll,
    )
