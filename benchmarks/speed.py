"""Speed and memory: the paper's Figure 10 (latency vs cache size), constant cost, batched throughput."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from benchmarks.common import Plan, Stopwatch, load_average, log, median, rss_bytes
from benchmarks.engine_runs import Geometry, decode_step_times, fill_session, load

CONTINUE_MESSAGE = "Continue."


def _text_ids(tokenizer, text: str, count: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the benchmark text tokenizes to nothing")
    while len(ids) < count:  # cycle a short text
        ids = ids + ids
    return ids[:count]


def decode_latency(model: str, checkpoint, text: str, plan: Plan, hf) -> dict:
    """Per-token decode latency at each cache size: recompute vs streaming (ours) vs dense (HF generate).

    Each run starts from a cache that is already full: the session is rebuilt from a transcript longer than
    the cache, then a short message is sent and every decode step after the first token is timed.
    HF generate gets a prompt of the same length, so its dense cache holds as many keys.
    """
    rows = []
    max_cache = max(plan.latency_cache_sizes)
    ids = _text_ids(hf.tokenizer, text, max_cache + 256)
    for cache in tqdm(plan.latency_cache_sizes, desc="latency vs cache size", unit="size"):
        row: dict = {"cache": cache, "load_avg": load_average()}
        # recompute re-encodes the whole cache per token: at the big sizes one timed token is all we can afford
        recompute_tokens = plan.latency_recompute_tokens if cache < 2048 else 1
        runs = [("streaming", "streaming", plan.speed_weights, plan.latency_decode_tokens),
                ("recompute", "recompute", plan.speed_weights, recompute_tokens)]
        if plan.speed_weights != "dense":  # the same streaming engine on dense weights, side by side
            runs.append(("streaming_dense", "streaming", "dense", plan.latency_decode_tokens))
        for key, policy, weights, tokens in runs:
            # big prefill chunks: the rebuild below takes a few steps, not cache / 256
            chunk = min(cache, 1024)
            engine = load(model, Geometry(policy, cache), prefill_chunk=chunk, max_step_tokens=chunk + 256,
                          dtype=plan.speed_dtype, weights=weights)
            sid = fill_session(engine, f"lat-{key}-{cache}", ids[: cache + 128])
            if policy != "recompute":
                # a first short turn absorbs the lazy re-ingest, so the timed turn starts from a warm, full
                # cache (recompute re-encodes everything every step anyway)
                decode_step_times(engine, sid, CONTINUE_MESSAGE, 1)
            timing = decode_step_times(engine, sid, CONTINUE_MESSAGE, tokens)
            info = engine.session_view(sid)
            row[key] = {
                "weights": weights,
                "median_ms": timing["median_step_s"] * 1e3,
                "min_ms": min(timing["step_s"]) * 1e3,
                "cpu_ms": timing["median_cpu_s"] * 1e3,
                "steps": len(timing["step_s"]),
                "cache_entries": info.cache_entries,
                "bytes_per_session": int(engine.bytes_per_session),
                "decode_weight_bytes": decode_weight_bytes(engine.runner.model),
            }
            del engine
        prompt = torch.tensor([ids[:cache]], dtype=torch.long)
        hf_timing = hf.decode_step_times(prompt, plan.latency_decode_tokens + 1)
        row["hf_dense"] = {"median_ms": hf_timing["median_step_s"] * 1e3, "min_ms": min(hf_timing["step_s"]) * 1e3,
                           "cpu_ms": hf_timing["median_cpu_s"] * 1e3,
                           "steps": len(hf_timing["step_s"])}
        # Recompute as HF would do it: one forward over the cache's tokens per generated token (its prefill).
        row["hf_recompute"] = {"ms": hf_timing["prefill_s"] * 1e3}
        row["recompute_over_streaming"] = row["recompute"]["median_ms"] / row["streaming"]["median_ms"]
        row["hf_recompute_over_streaming"] = row["hf_recompute"]["ms"] / row["streaming"]["median_ms"]
        row["hf_dense_over_streaming"] = row["hf_dense"]["median_ms"] / row["streaming"]["median_ms"]
        log(
            f"cache {cache}: streaming {row['streaming']['median_ms']:.1f} ms, recompute "
            f"{row['recompute']['median_ms']:.0f} ms, HF dense {row['hf_dense']['median_ms']:.1f} ms"
        )
        rows.append(row)
    return {"rows": rows, "hf_attn_implementation": hf.attn_implementation, "dtype": plan.speed_dtype,
            "weights": plan.speed_weights}


def decode_weight_bytes(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every linear layer in the form the step uses (packed int4
    and its scales, or the dense matrix) and the norms; the embedding table only as the (tied) output head."""
    from sinkserve.engine.quant import PackedLinear

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            parts = [module.packed, module.scales_and_zeros, module.bias]
        elif isinstance(module, torch.nn.Embedding):
            continue  # a lookup reads one row
        else:
            parts = list(module.parameters(recurse=False))
        for t in parts:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


PROMPTS = [
    "Tell me about the history of the printing press.",
    "How do bees communicate with each other?",
    "Explain what a hash table is to a beginner.",
    "Write a short poem about autumn rain.",
    "What are the main causes of ocean tides?",
    "Give me three tips for learning to cook.",
    "Why is the sky blue during the day?",
    "Describe a good morning routine.",
]


def batched_throughput(model: str, plan: Plan, hf, hf_fp32=None) -> dict:
    """Total decode tokens/s with N concurrent sessions in one engine, vs HF generate with batch N."""
    from sinkserve.protocol import GenerationParams

    rows = []
    for sessions in tqdm(plan.throughput_sessions, desc="batched throughput", unit="batch"):
        engine = load(model, Geometry("streaming", plan.throughput_cache), slots=sessions,
                      dtype=plan.speed_dtype, weights=plan.speed_weights)
        sids = [engine.open_session() for _ in range(sessions)]
        params = GenerationParams(max_tokens=plan.throughput_decode_steps + 8, ignore_eos=True)
        for i, sid in enumerate(sids):
            engine.add_message(sid, PROMPTS[i % len(PROMPTS)] + f" (#{i})", params)
        started = set()
        prefill_steps = 0
        while len(started) < sessions:  # prefill: until every session has its first token
            started.update(o.session_id for o in engine.step() if o.token_id is not None)
            prefill_steps += 1
        produced = 0
        step_s = []
        for _ in range(plan.throughput_decode_steps):
            start = time.perf_counter()
            outs = engine.step()
            step_s.append(time.perf_counter() - start)
            produced += sum(1 for o in outs if o.token_id is not None)
        total_s = sum(step_s)
        rss = rss_bytes()
        del engine
        prompt = hf.chat_prompt_ids(PROMPTS[0]).repeat(sessions, 1)
        hf_timing = hf.decode_step_times(prompt, plan.throughput_decode_steps + 1)
        hf_tps = sessions / hf_timing["median_step_s"]
        row = {
            "sessions": sessions,
            "prefill_steps": prefill_steps,
            "decode_tokens": produced,
            "tokens_per_s": produced / total_s,
            "median_step_ms": median(step_s) * 1e3,
            "rss_mib": rss / 2**20,
            "hf_batch_tokens_per_s": hf_tps,
            "hf_median_step_ms": hf_timing["median_step_s"] * 1e3,
            "load_avg": load_average(),
        }
        row["speedup_vs_hf_same_batch"] = row["tokens_per_s"] / hf_tps
        log(f"{sessions} sessions: {row['tokens_per_s']:.1f} tok/s (HF batch {sessions}: {hf_tps:.1f} tok/s)")
        rows.append(row)
    hf_fp32_single = None
    if hf_fp32 is not None and hf_fp32 is not hf:
        timing = hf_fp32.decode_step_times(hf_fp32.chat_prompt_ids(PROMPTS[0]), plan.throughput_decode_steps + 1)
        hf_fp32_single = 1 / timing["median_step_s"]
    single = rows[0]["tokens_per_s"] if rows and rows[0]["sessions"] == 1 else None
    hf_single = rows[0]["hf_batch_tokens_per_s"] if rows and rows[0]["sessions"] == 1 else None
    for row in rows:
        row["scaling_vs_1"] = row["tokens_per_s"] / single if single else None
    single_dense = None
    if plan.speed_weights != "dense":  # the same single session on dense weights
        engine = load(model, Geometry("streaming", plan.throughput_cache), slots=1, dtype=plan.speed_dtype)
        sid = engine.open_session()
        timing = decode_step_times(engine, sid, PROMPTS[0], plan.throughput_decode_steps)
        single_dense = 1 / timing["median_step_s"]
        del engine
    return {
        "cache": plan.throughput_cache,
        "rows": rows,
        "single_session_tokens_per_s": single,
        "hf_single_tokens_per_s": hf_single,
        "single_vs_hf": single / hf_single if single and hf_single else None,
        "dtype": plan.speed_dtype,
        "weights": plan.speed_weights,
        "single_dense_tokens_per_s": single_dense,
        "single_dense_vs_hf": single_dense / hf_single if single_dense and hf_single else None,
        "hf_fp32_single_tokens_per_s": hf_fp32_single,
        "single_vs_hf_fp32": single / hf_fp32_single if single and hf_fp32_single else None,
    }


def constant_cost(model: str, text: str, plan: Plan, total_tokens: int, probe_tokens: int, label: str) -> dict:
    """One session streams `total_tokens` tokens; per-token decode latency and process RSS sampled along it.

    The stream is a chat: each turn sends the next slice of the text (ingested by chunked prefill) and then
    decodes `probe_tokens` tokens, whose step times are the latency sample at that position.

    A control runs beside it: at every sample a fresh session, rebuilt from a transcript just long enough to
    fill its cache, decodes as many tokens. It does the same work per token at a fixed, early position, so the
    stream's time over the control's separates a cost that grows with position from the machine's own speed
    drifting during the run.
    """
    from sinkserve.protocol import GenerationParams

    engine = load(model, Geometry("streaming", plan.constant_cache), prefill_chunk=plan.constant_cache,
                  dtype=plan.speed_dtype, weights=plan.speed_weights, slots=2)
    tokenizer = engine.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    message_len = plan.constant_message_tokens
    sid = engine.open_session()
    params = GenerationParams(max_tokens=probe_tokens, ignore_eos=True)
    samples = []
    cursor = 0
    seen = 0
    wall_start = time.perf_counter()
    bar = tqdm(total=total_tokens, desc=f"constant cost ({label})", unit="tok", unit_scale=True)
    deadline = wall_start + plan.constant_max_minutes * 60
    while seen < total_tokens and time.perf_counter() < deadline:
        if cursor + message_len > len(ids):
            cursor = 0
        message = tokenizer.decode(ids[cursor : cursor + message_len])
        cursor += message_len
        engine.add_message(sid, message, params)
        decode_s = []
        prefill_s = 0.0
        produced = 0
        while engine.has_work():
            start = time.perf_counter()
            outs = engine.step()
            elapsed = time.perf_counter() - start
            got = sum(1 for o in outs if o.token_id is not None)
            if produced == 0:
                prefill_s += elapsed
            elif got:
                decode_s.append(elapsed)
            produced += got
        info = engine.session_view(sid)
        bar.update(info.tokens_seen - seen)
        seen = info.tokens_seen
        control = fill_session(engine, "control", ids[: plan.constant_cache + 64])
        decode_step_times(engine, control, CONTINUE_MESSAGE, 1)  # absorbs the lazy re-ingest
        control_ms = decode_step_times(engine, control, CONTINUE_MESSAGE, probe_tokens)["median_step_s"] * 1e3
        engine.close_session(control)
        samples.append(
            {
                "tokens_seen": seen,
                "decode_ms": median(decode_s) * 1e3,
                "control_decode_ms": control_ms,
                "over_control": median(decode_s) * 1e3 / control_ms,
                "prefill_ms_per_token": prefill_s * 1e3 / max(message_len, 1),
                "rss_mib": rss_bytes() / 2**20,
                "cache_entries": info.cache_entries,
                "elapsed_s": time.perf_counter() - wall_start,
            }
        )
    bar.close()
    bytes_per_session = int(engine.bytes_per_session)
    model_name = engine.model_name
    del engine
    return {
        "label": label,
        "model": model_name,
        "cache": plan.constant_cache,
        "total_tokens": seen,
        "target_tokens": total_tokens,
        "stopped_by_time_cap": seen < total_tokens,
        "max_minutes": plan.constant_max_minutes,
        "message_tokens": message_len,
        "probe_tokens": probe_tokens,
        "bytes_per_session": bytes_per_session,
        "samples": samples,
        **flatness(samples),
    }


def flatness(samples: list[dict], early_tokens: int = 10_000) -> dict:
    """Compare the first `early_tokens` of the stream with its last tenth: latency and RSS ratios. Also a
    least-squares line through every latency sample, so a drift can be told from noise in the two windows."""
    if not samples:
        return {}
    total = samples[-1]["tokens_seen"]
    early = [s for s in samples if s["tokens_seen"] <= early_tokens] or samples[:1]
    late = [s for s in samples if s["tokens_seen"] >= 0.9 * total] or samples[-1:]
    early_ms = median([s["decode_ms"] for s in early])
    late_ms = median([s["decode_ms"] for s in late])
    early_rss = median([s["rss_mib"] for s in early])
    late_rss = median([s["rss_mib"] for s in late])
    xs = [s["tokens_seen"] for s in samples]

    def fitted_ratio(ys: list[float]) -> float | None:
        """A least-squares line through (tokens, y): its value at the end over its value at `early_tokens`."""
        if len(set(xs)) < 2:
            return None
        slope, intercept = statistics.linear_regression(xs, ys)
        start = intercept + slope * min(early_tokens, total)
        return (intercept + slope * total) / start if start > 0 else None

    ys = [s["decode_ms"] for s in samples]
    ordered = sorted(ys)
    control = {}
    if all("over_control" in s for s in samples):
        over = [s["over_control"] for s in samples]
        control = {
            "over_control_median": median(over),
            "over_control_ratio": median([s["over_control"] for s in late]) / median([s["over_control"] for s in early]),
            "over_control_fit_ratio": fitted_ratio(over),
            "control_fit_ratio": fitted_ratio([s["control_decode_ms"] for s in samples]),
        }
    return {
        "early_decode_ms": early_ms,
        "late_decode_ms": late_ms,
        "latency_ratio": late_ms / early_ms,
        "early_samples": len(early),
        "late_samples": len(late),
        "fit_ratio": fitted_ratio(ys),  # the fitted line, end over 10k tokens
        **control,
        "decode_ms_p10": ordered[len(ordered) // 10],
        "decode_ms_p90": ordered[(9 * len(ordered)) // 10],
        "early_rss_mib": early_rss,
        "late_rss_mib": late_rss,
        "rss_ratio": late_rss / early_rss,
        "max_rss_mib": max(s["rss_mib"] for s in samples),
    }


def roofline(latency: dict, bandwidth: dict) -> dict:
    """Measured streaming decode step vs the floor: the weights it reads and the session's KV, once, at the
    read bandwidth. One row per cache size and weight format timed."""
    read = bandwidth["read_gbps"] * 1e9
    rows = []
    for row in latency["rows"]:
        for key in ("streaming", "streaming_dense"):
            run = row.get(key)
            if not run:
                continue
            weights, kv = run["decode_weight_bytes"], run["bytes_per_session"]
            floor_ms = (weights + kv) / read * 1e3
            rows.append(
                {
                    "cache": row["cache"],
                    "weights": run["weights"],
                    "weight_bytes": weights,
                    "kv_bytes": kv,
                    "floor_ms": floor_ms,
                    "measured_ms": run["median_ms"],
                    "measured_over_floor": run["median_ms"] / floor_ms,
                    "effective_gbps": (weights + kv) / (run["median_ms"] / 1e3) / 1e9,
                }
            )
    return {"read_gbps": bandwidth["read_gbps"], "rows": rows}


__all__ = ["decode_latency", "batched_throughput", "constant_cost", "roofline", "decode_weight_bytes", "Stopwatch"]
