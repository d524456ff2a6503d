"""The issue's targets (and DESIGN.md §6's), checked against one run's results."""

from __future__ import annotations


def _target(key: str, what: str, goal: str, measured: str, met: bool | None, limit_hint: str = "") -> dict:
    return {"key": key, "what": what, "target": goal, "measured": measured, "met": met, "limit_hint": limit_hint}


def evaluate_targets(results: dict) -> list[dict]:
    out: list[dict] = []
    quality = results.get("quality", {})
    pol = quality.get("policies")
    if pol:
        ratio = pol["streaming_vs_recompute"]
        out.append(_target("ppl_streaming_vs_recompute", "streaming perplexity vs sliding window with re-computation",
                           "within 5%", f"{(ratio - 1) * 100:+.2f}% (cache {pol['cache']}, "
                           f"{pol['common_tokens']} tokens)", abs(ratio - 1) <= 0.05))
        rows = {r["policy"]: r for r in pol["rows"]}
        window_all, streaming_all = rows["window"].get("ppl_all"), rows["streaming"].get("ppl_all")
        if window_all and streaming_all:
            wratio, basis = window_all / streaming_all, pol["all_tokens"]
        else:
            wratio, basis = pol["window_vs_streaming"], pol["common_tokens"]
        out.append(_target("ppl_window_vs_streaming", "window attention (no sinks) vs streaming",
                           ">= 3x worse", f"{wratio:.2f}x ({basis:,} tokens)", wratio >= 3))
    long = quality.get("long")
    if long:
        dense_beyond = long["dense"]["ppl_beyond_context"]
        stream_beyond = long["streaming"]["ppl_beyond_context"]
        stream_inside = long["streaming"]["ppl_within_context"]
        if dense_beyond is not None and stream_beyond is not None:
            degrade = dense_beyond / stream_beyond
            drift = stream_beyond / stream_inside
            out.append(_target(
                "long_stream", f"{long['tokens']:,} tokens, past the {long['context_length']:,}-token pretraining "
                "length", "dense degrades (>= 2x streaming past the length), streaming flat (within 25% of its "
                "own perplexity inside the length)",
                f"dense/streaming past the length {degrade:.1f}x; streaming past/inside {drift:.2f}",
                degrade >= 2 and abs(drift - 1) <= 0.25))
    lat = results.get("latency")
    if lat:
        by_size = {r["cache"]: r for r in lat["rows"]}
        biggest = max(by_size)
        r4096 = by_size[biggest]["recompute_over_streaming"]
        out.append(_target("latency_recompute_ratio", f"recompute / streaming per-token latency at cache {biggest}",
                           ">= 22x (paper: 22.2x)", f"{r4096:.1f}x", r4096 >= 22 if biggest >= 4096 else None))
        hf_ratio = by_size[biggest].get("hf_recompute_over_streaming")
        if hf_ratio is not None:
            out.append(_target("latency_hf_recompute_ratio",
                               f"recompute done by HF transformers / streaming per-token latency at cache {biggest}",
                               ">= 22x (paper: 22.2x)", f"{hf_ratio:.1f}x",
                               hf_ratio >= 22 if biggest >= 4096 else None))
        worst = max(r["streaming"]["median_ms"] for r in lat["rows"])
        smallest = min(by_size)
        flat = by_size[biggest]["streaming"]["median_ms"] / by_size[smallest]["streaming"]["median_ms"]
        weights = lat.get("weights", "dense")
        out.append(_target("latency_streaming_abs", f"streaming ms per token ({weights} weights), every cache size "
                           "(DESIGN §6)",
                           "<= 25 ms, and cache 4096 <= 1.2x cache 256",
                           f"worst {worst:.1f} ms; {biggest}/{smallest} = {flat:.2f}x", worst <= 25 and flat <= 1.2,
                           "decode_b1"))
    roof = results.get("roofline")
    if roof:
        weights = (lat or {}).get("weights", "dense")
        primary = [r for r in roof["rows"] if r.get("weights", weights) == weights]
        worst = max(r["measured_over_floor"] for r in primary)
        out.append(_target("roofline", f"decode step vs (weights + KV bytes) / read bandwidth ({weights} weights)",
                           "<= 1.5x the floor", f"{min(r['measured_over_floor'] for r in primary):.2f}x .. "
                           f"{worst:.2f}x", worst <= 1.5, "decode_b1"))
    const = results.get("constant_cost", {})
    for label, need in (("tiny", 1_000_000), ("model", 100_000)):
        run = const.get(label)
        if not run:
            continue
        lat_ok = abs(run["latency_ratio"] - 1) <= 0.10
        rss_ok = abs(run["rss_ratio"] - 1) <= 0.10
        long_enough = run["total_tokens"] >= need
        out.append(_target(
            f"constant_{label}", f"constant cost along the stream ({run['label']})",
            f">= {need:,} tokens; latency and RSS flat within 10% (first 10k tokens vs last tenth)",
            f"{run['total_tokens']:,} tokens; latency {run['latency_ratio']:.3f}x, RSS {run['rss_ratio']:.3f}x"
            + (f" (fitted trend {run['fit_ratio']:.3f}x)" if run.get("fit_ratio") is not None else "")
            + (f"; over the control session {run['over_control_ratio']:.3f}x (fitted {run['over_control_fit_ratio']:.3f}x)"
               if run.get("over_control_ratio") is not None else ""),
            # a short stream (quick mode) is dominated by noise: report it, judge only the full length
            (lat_ok and rss_ok) if long_enough else None))
    thr = results.get("throughput")
    if thr:
        if thr.get("single_vs_hf"):
            weights = thr.get("weights", "dense")
            dense = (f"; dense weights {thr['single_dense_tokens_per_s']:.1f} tok/s = {thr['single_dense_vs_hf']:.2f}x"
                     if thr.get("single_dense_vs_hf") else "")
            out.append(_target("single_vs_hf", f"single-session decode tokens/s ({weights} weights) vs HF transformers "
                               f"generate, same activation dtype ({thr.get('dtype', 'float32')})",
                               ">= 2x", f"{thr['single_session_tokens_per_s']:.1f} vs "
                               f"{thr['hf_single_tokens_per_s']:.1f} tok/s = {thr['single_vs_hf']:.2f}x{dense}",
                               thr["single_vs_hf"] >= 2, "decode_b1"))
        row64 = next((r for r in thr["rows"] if r["sessions"] == 64), None)
        if row64:
            out.append(_target("throughput_64", "64 concurrent sessions, total decode tokens/s (DESIGN §6)",
                               ">= 300 tok/s", f"{row64['tokens_per_s']:.0f} tok/s", row64["tokens_per_s"] >= 300,
                               "decode_batched"))
    return out
