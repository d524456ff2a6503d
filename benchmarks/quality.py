"""Perplexity: the paper's Tables 1, 2, 6 and its long-stream figure, through sinkserve's own engine.

Every number is `sinkserve.engine.eval.evaluate_ppl` over the same text: each token is scored with exactly
the cache the policy would hold before it (chunked for speed, not for approximation).
"""

from __future__ import annotations

import math

from benchmarks.common import Plan, Stopwatch, log
from benchmarks.engine_runs import Geometry, load


def _ppl_of(nlls: list[float], count: int | None = None) -> float:
    part = nlls if count is None else nlls[:count]
    return math.exp(sum(part) / len(part)) if part else float("nan")


def _evaluate(model: str, geometry: Geometry, text: str, tokens: int, chunk: int) -> dict:
    from sinkserve.engine.eval import evaluate_ppl

    # recompute scores several positions per forward on a scratch slab of its own (engine/eval.py)
    engine = load(model, geometry, prefill_chunk=chunk)
    log(f"ppl {geometry.label}: {tokens} tokens")
    with Stopwatch() as watch:
        result = evaluate_ppl(engine, text, max_tokens=tokens, chunk=chunk, progress=True)
    nlls = [float(x) for x in result.nlls]
    del engine
    return {
        "policy": geometry.policy,
        "cache": geometry.cache,
        "sinks": geometry.engine_fields()["sinks"],
        "label": geometry.label,
        "tokens": len(nlls) + 1,  # the first token has no prediction
        "ppl": float(result.ppl),
        "seconds": watch.seconds,
        "nlls": nlls,
        "engine_result": {k: v for k, v in result.as_dict().items() if not isinstance(v, (list, tuple))},
    }


def _strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "nlls"}


def policies_table(model: str, text: str, plan: Plan) -> dict:
    """Dense, window, recompute, streaming at one cache size; recompute compared on its (shorter) prefix."""
    cache = plan.ppl_cache
    runs = {}
    for policy in ("dense", "window", "streaming"):
        capacity = plan.ppl_tokens + 8 if policy == "dense" else cache
        runs[policy] = _evaluate(model, Geometry(policy, capacity), text, plan.ppl_tokens, plan.ppl_chunk)
    runs["recompute"] = _evaluate(
        model, Geometry("recompute", cache), text, plan.recompute_ppl_tokens, plan.ppl_chunk
    )
    common = min(len(r["nlls"]) for r in runs.values())
    rows = []
    dense_common = _ppl_of(runs["dense"]["nlls"], common)
    for policy in ("dense", "window", "recompute", "streaming"):
        run = runs[policy]
        ppl_common = _ppl_of(run["nlls"], common)
        rows.append(
            {
                **_strip(run),
                "ppl_common": ppl_common,
                "vs_dense_common": ppl_common / dense_common,
                "ppl_all": run["ppl"] if len(run["nlls"]) > common else None,
            }
        )
    by_policy = {row["policy"]: row for row in rows}
    return {
        "cache": cache,
        "common_tokens": common + 1,
        "all_tokens": plan.ppl_tokens,
        "rows": rows,
        "streaming_vs_recompute": by_policy["streaming"]["ppl_common"] / by_policy["recompute"]["ppl_common"],
        # window and streaming are both scored on every token: compare them on all of them
        "window_vs_streaming": runs["window"]["ppl"] / runs["streaming"]["ppl"],
        "_nlls": {p: runs[p]["nlls"] for p in runs},
    }


def sinks_table(model: str, text: str, plan: Plan, reuse: dict | None = None) -> dict:
    rows = []
    for sinks in plan.sink_counts:
        geometry = Geometry("streaming", plan.ppl_cache, sinks=sinks)
        rows.append(_strip(_evaluate(model, geometry, text, plan.ppl_tokens, plan.ppl_chunk)))
    return {"cache": plan.ppl_cache, "tokens": plan.ppl_tokens, "rows": rows}


def cache_size_table(model: str, text: str, plan: Plan, dense_nlls: list[float]) -> dict:
    rows = []
    tokens = plan.cache_size_tokens or plan.ppl_tokens
    for cache in plan.cache_sizes_ppl:
        run = _evaluate(model, Geometry("streaming", cache), text, tokens, plan.ppl_chunk)
        row = _strip(run)
        # dense is scored on the policy table's tokens: compare on those
        common = min(len(run["nlls"]), len(dense_nlls))
        row["ppl_vs_dense_tokens"] = common + 1
        row["vs_dense"] = _ppl_of(run["nlls"], common) / _ppl_of(dense_nlls, common)
        rows.append(row)
    return {"sinks": 4, "tokens": tokens, "rows": rows}


def binned_ppl(nlls: list[float], bin_tokens: int) -> list[dict]:
    bins = []
    for start in range(0, len(nlls), bin_tokens):
        part = nlls[start : start + bin_tokens]
        if len(part) < bin_tokens // 2:
            break
        # nlls[i] scores token i + 1 (the first token has no prediction)
        bins.append({"start": start + 1, "end": start + len(part), "ppl": math.exp(sum(part) / len(part))})
    return bins


def long_stream(model: str, text: str, plan: Plan, context_length: int) -> dict:
    """Past the pretraining length: dense (allowed past the model's context) vs streaming, per position."""
    tokens = plan.long_tokens
    dense = _evaluate(model, Geometry("dense", tokens + 8), text, tokens, plan.long_chunk)
    streaming = _evaluate(model, Geometry("streaming", plan.long_cache), text, tokens, plan.long_chunk)
    bin_tokens = max(16, min(1024, tokens // 16))
    result = {
        "tokens": tokens,
        "context_length": context_length,
        "streaming_cache": plan.long_cache,
        "bin_tokens": bin_tokens,
        "dense": {**_strip(dense), "bins": binned_ppl(dense["nlls"], bin_tokens)},
        "streaming": {**_strip(streaming), "bins": binned_ppl(streaming["nlls"], bin_tokens)},
        "_nlls": {"dense": dense["nlls"], "streaming": streaming["nlls"]},
    }
    for name in ("dense", "streaming"):
        nlls = result["_nlls"][name]
        inside = nlls[: context_length - 1]
        beyond = nlls[context_length - 1 :]
        result[name]["ppl_within_context"] = _ppl_of(inside)
        result[name]["ppl_beyond_context"] = _ppl_of(beyond) if beyond else None
        tail = nlls[-bin_tokens * 2 :]
        result[name]["ppl_last_2k"] = _ppl_of(tail)
    return result
