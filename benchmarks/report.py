"""docs/benchmarks.md and docs/benchmarks.json from one run's results."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _public(obj):
    """Drop the private (underscore) keys: per-token lists that only feed the plots."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_public(results), indent=1, sort_keys=False) + "\n")


def _machine(meta: dict) -> list[str]:
    m = meta["machine"]
    lines = ["## Machine and run", ""]
    lines += _table(
        ["", ""],
        [
            ["CPU", f"{m['cpu']}, {m['logical_cpus']} logical CPUs ({m['affinity_cpus']} usable)"],
            ["memory", f"{m['memory_gib']} GiB"],
            ["GPU", m["gpu"] or "none"],
            ["software", f"{m['os']}; Python {m['python']}; torch {m['torch']} ({m['torch_threads']} threads); "
                         f"transformers {m['transformers']}"],
            ["model", f"{meta['model_name']} from `{meta['checkpoint']}`; speed sections in "
                      f"{meta['plan'].get('speed_dtype', 'float32')} with {meta['plan'].get('speed_weights', 'dense')} "
                      "weights (dense timed beside them), quality in float32"],
            ["text", meta["text_source"]],
            ["mode", f"`{meta['plan']['name']}`; git commit `{m['git_commit']}`"],
            ["started / finished", f"{meta['started']} / {meta.get('finished', 'running')}"],
            ["wall time", f"{meta.get('wall_s', 0) / 60:.1f} min"],
            ["load average", f"{_num(meta.get('load_min'))} .. {_num(meta.get('load_max'))} "
                             "(1-minute, sampled during the run)"],
        ],
    )
    by_section = {k: v for k, v in (meta.get("other_cores_by_section") or {}).items() if v is not None}
    if by_section:
        lines += ["CPU cores kept busy by other processes (mean, per section): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in by_section.items()) + ".", ""]
    if meta.get("contended"):
        lines += [
            f"> **Shared machine.** The 1-minute load average reached {_num(meta['load_max'])} on "
            f"{m['logical_cpus']} CPUs while this ran: other work (tests, builds) competed for the cores, "
            "so absolute timings are pessimistic and noisier than on an idle machine. Ratios are measured side "
            "by side and suffer less.",
            "",
        ]
    return lines


def _targets(targets: list[dict]) -> list[str]:
    lines = ["## Targets", ""]
    mark = {True: "met", False: "**missed**", None: "not checked at this length"}
    lines += _table(
        ["target", "goal", "measured", "result"],
        [[t["what"], t["target"], t["measured"], mark[t["met"]]] for t in targets],
    )
    return lines


def _quality(q: dict, imgs: dict) -> list[str]:
    lines = ["## Quality: perplexity through the engine", ""]
    lines += [
        "Perplexity of the text, every token scored against exactly the cache its policy holds before it "
        "(`sinkserve.engine.eval.evaluate_ppl`; chunks only batch the work). Cache size = tokens attended = "
        "sinks + window. `recompute` re-encodes the last `cache` tokens for every token (the paper's sliding "
        "window with re-computation, no sinks); `window` keeps the last `cache` KV entries and no sinks; "
        "`dense` evicts nothing.",
        "",
    ]
    pol = q.get("policies")
    if pol:
        lines += [f"### Cache policies at cache {pol['cache']} (paper Table 1)", ""]
        rows = []
        for r in pol["rows"]:
            rows.append([r["policy"], r["label"], _num(r["ppl_common"]), f"{r['vs_dense_common']:.3f}x",
                         _num(r["ppl_all"]) if r.get("ppl_all") else "–", f"{r['seconds']:.0f}"])
        lines += _table(
            ["policy", "geometry", f"PPL, first {pol['common_tokens']:,} tokens", "vs dense",
             f"PPL, {pol['all_tokens']:,} tokens", "seconds"],
            rows,
        )
        lines += [f"Streaming vs recompute (first {pol['common_tokens']:,} tokens): "
                  f"{(pol['streaming_vs_recompute'] - 1) * 100:+.2f}%; window vs streaming "
                  f"({pol['all_tokens']:,} tokens): "
                  f"{next(r['ppl_all'] for r in pol['rows'] if r['policy'] == 'window') / next(r['ppl_all'] for r in pol['rows'] if r['policy'] == 'streaming'):.2f}x.",
                  ""]
    sinks = q.get("sinks")
    if sinks:
        lines += [f"### Number of attention sinks at cache {sinks['cache']} (paper Table 2)", ""]
        lines += _table(["sinks", "geometry", f"PPL, {sinks['tokens']:,} tokens"],
                        [[r["sinks"], r["label"], _num(r["ppl"])] for r in sinks["rows"]])
    sizes = q.get("cache_sizes")
    if sizes:
        lines += ["### Cache size with 4 sinks (paper Table 6)", ""]
        lines += ["`vs dense` compares both on the tokens dense was scored on (the policy table's).", ""]
        lines += _table(["cache", "geometry", f"PPL, {sizes['tokens']:,} tokens", "vs dense"],
                        [[r["cache"], r["label"], _num(r["ppl"]),
                          f"{r['vs_dense']:.3f}x" if r.get("vs_dense") else "–"] for r in sizes["rows"]])
    if "quality" in imgs:
        lines += [f"![policies and sinks](img/{imgs['quality']})", ""]
    long = q.get("long")
    if long:
        lines += [f"### {long['tokens']:,} tokens, past the {long['context_length']:,}-token pretraining length "
                  "(paper Figure 3/5)", ""]
        rows = []
        for name in ("dense", "streaming"):
            r = long[name]
            rows.append([name, r["label"], _num(r["ppl_within_context"]), _num(r["ppl_beyond_context"]),
                         _num(r["ppl_last_2k"]), f"{r['seconds']:.0f}"])
        inside_end = min(long["context_length"], long["tokens"])
        beyond = (f"PPL, tokens {long['context_length']:,}–{long['tokens']:,}"
                  if long["tokens"] > long["context_length"] else "PPL past the length (not reached)")
        lines += _table(["policy", "geometry", f"PPL, tokens 1–{inside_end:,}", beyond,
                         f"PPL, last {min(2 * long['bin_tokens'], long['tokens']):,}", "seconds"], rows)
        if "long" in imgs:
            lines += [f"![perplexity vs position](img/{imgs['long']})", ""]
    return lines


def _tensor_parallel(tp: dict | None) -> list[str]:
    if not tp:
        return []
    sessions = tp["sessions"]
    lines = [
        "## Tensor parallelism on this CPU", "",
        f"{tp['model']} ({tp['dtype']}; the bundled SmolLM2 splits only in 3 shards), one shard per process "
        "joined by gloo on 127.0.0.1, each with cpus / N threads. Decode: one session at cache "
        f"{tp['cache']}, {tp['steps']} greedy steps; then {sessions} sessions decoding together. On two cores "
        "TP=2 is slower than TP=1, as expected: the shards split the same cores and every step adds two "
        "all-reduces per layer, the embedding's all-reduce, the logits' gather, the broadcast of the step's rows "
        "and a second Python dispatch. This measures that overhead, not what shards on GPUs give.", "",
        f"| variant | decode ms/token | tok/s, {sessions} sessions | parameters per shard (MiB) |",
        "|---|---:|---:|---|",
    ]
    for row in tp["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['variant']} | skipped: {row['skipped']} | | |")
            continue
        lines.append(f"| {row['variant']} | {row['decode_ms_per_token']:.1f} | "
                     f"{row[f'tok_s_{sessions}_sessions']:.1f} | {', '.join(map(str, row['parameter_mib_per_shard']))} |")
    return lines + [""]


def _speed(results: dict, imgs: dict) -> list[str]:
    lines = ["## Speed and memory", ""]
    lat = results.get("latency")
    roof = results.get("roofline")
    if lat:
        lines += ["### Per-token decode latency vs cache size (paper Figure 10)", ""]
        weights = lat.get("weights", "dense")
        lines += [
            f"Batch 1, {results['meta']['plan'].get('speed_dtype', 'float32')} activations, median over the timed "
            "decode steps, each from a full cache (a session rebuilt from a longer transcript). `streaming` and "
            f"`recompute` run {weights} weights"
            + (" (engine/quant.py: decode steps read the bundled GGUF's own 4-bit Q4_1 blocks, its Q8_0 output "
               "head as two 4-bit halves, through torch's packed CPU kernel; steps of more than 8 rows, so the "
               "recompute re-encodes, run the same values de-quantized), `streaming, dense` the same engine on "
               "dense weights" if weights == "int4" else "")
            + ". Dense is HF transformers `generate` in the same activation dtype with dense weights "
            f"({lat['hf_attn_implementation']} attention) and a prompt as long as the cache.",
            "",
        ]
        dense_col = any("streaming_dense" in r for r in lat["rows"])
        rows = []
        for r in lat["rows"]:
            rows.append([r["cache"], _num(r["streaming"]["median_ms"], 1), _num(r["streaming"].get("min_ms"), 1),
                         _num(r["streaming"].get("cpu_ms"), 1)]
                        + ([_num(r.get("streaming_dense", {}).get("median_ms"), 1)] if dense_col else [])
                        + [_num(r["recompute"]["median_ms"], 0), _num(r["hf_dense"]["median_ms"], 1),
                           _num(r["hf_dense"].get("min_ms"), 1), _num(r["hf_dense"].get("cpu_ms"), 1),
                           f"{r['recompute_over_streaming']:.1f}x",
                           _num(r.get("hf_recompute", {}).get("ms"), 0),
                           f"{r['hf_recompute_over_streaming']:.1f}x" if "hf_recompute_over_streaming" in r else "–",
                           f"{r['hf_dense_over_streaming']:.2f}x",
                           _num(r["streaming"]["bytes_per_session"] / 2**20, 1)])
        lines += _table(["cache", "streaming ms", "(best)", "(CPU ms)"] + (["streaming, dense ms"] if dense_col else [])
                        + ["recompute ms", "HF dense ms", "(best)", "(CPU ms)", "recompute / streaming",
                           "HF recompute ms", "HF recompute / streaming", "HF dense / streaming", "KV MiB / session"],
                        rows)
        lines += ["Ratios use medians of wall time; `(best)` is the fastest single step, closer to the cost on an "
                  "idle machine; `(CPU ms)` is the CPU time this process spent per step, all threads together "
                  "(on an idle machine about threads x wall). Recompute times "
                  f"{', '.join(str(r['recompute']['steps']) for r in lat['rows'])} step(s) per size: each is a "
                  "full re-encode of the cache. `HF recompute` is the same re-encode done by HF transformers (its "
                  "prefill of a prompt as long as the cache, one per generated token): the baseline the paper timed, "
                  "and a fairer one where sinkserve's own chunked prefill is the slower of the two.", ""]
        if "latency" in imgs:
            lines += [f"![latency vs cache size](img/{imgs['latency']})", ""]
    bw = results.get("bandwidth")
    if bw:
        lines += ["### The physical limit: memory bandwidth", ""]
        lines += _table(["measure", "GB/s"], [
            [f"torch copy of {bw['buffer_mib']} MiB (read + write counted)", _num(bw["copy_gbps"], 1)],
            ["numpy copy (read + write counted)", _num(bw["numpy_copy_gbps"], 1)],
            ["torch sum (read)", _num(bw["read_gbps"], 1)],
            ["torch fp32 GEMV (matrix bytes / time)", _num(bw["gemv_fp32_gbps"], 1)],
        ])
    if roof:
        lines += [
            "A batch-1 decode step must read the weights it uses and the session's KV once; at the read "
            "bandwidth above that takes the floor below (int4: the packed 4-bit weights and their scales; dense: "
            "the 16-bit matrices; the embedding table counts only as the tied output head).",
            "",
        ]
        lines += _table(["cache", "weights", "weights MiB", "KV MiB", "floor ms", "measured ms", "measured / floor",
                         "effective GB/s"],
                        [[r["cache"], r.get("weights", "dense"), _num(r["weight_bytes"] / 2**20, 0),
                          _num(r["kv_bytes"] / 2**20, 1),
                          _num(r["floor_ms"], 1), _num(r["measured_ms"], 1), f"{r['measured_over_floor']:.2f}x",
                          _num(r["effective_gbps"], 1)] for r in roof["rows"]])
    const = results.get("constant_cost", {})
    if const:
        lines += ["### Constant cost along an endless stream", ""]
        lines += [
            "One session, one chat: each turn sends the next slice of the text (ingested by chunked prefill), "
            "then decodes a few tokens whose step times are the latency sample at that position. RSS is the "
            "whole benchmark process. The control is a fresh session with a full cache, rebuilt and timed at every "
            "sample: the same work per token at a fixed early position, so stream / control separates a cost that "
            "grows with the stream from the machine's speed drifting during the run.",
            "",
        ]
        rows = []
        for key, run in const.items():
            rows.append([run["label"], _num(run["total_tokens"]), run["cache"],
                         f"{run['message_tokens']} + {run['probe_tokens']}",
                         _num(run["early_decode_ms"]), _num(run["late_decode_ms"]), f"{run['latency_ratio']:.3f}x",
                         _num(run["early_rss_mib"], 0), _num(run["late_rss_mib"], 0), f"{run['rss_ratio']:.3f}x",
                         f"{run['over_control_ratio']:.3f}x" if run.get("over_control_ratio") else "–",
                         f"{run['over_control_fit_ratio']:.3f}x" if run.get("over_control_fit_ratio") else "–"])
        lines += _table(["model", "tokens", "cache", "per turn: text + decoded", "decode ms, first 10k",
                         "decode ms, last tenth", "ratio", "RSS MiB, first 10k", "RSS MiB, last tenth", "ratio",
                         "stream / control, last tenth vs first 10k", "stream / control, fitted trend"],
                        rows)
        for run in const.values():
            if run.get("stopped_by_time_cap"):
                lines += [f"- {run['label']}: stopped by the {run['max_minutes']:g}-minute cap at "
                          f"{run['total_tokens']:,} of {run['target_tokens']:,} tokens."]
        lines += [""]
        for key in const:
            if f"constant_{key}" in imgs:
                lines += [f"![constant cost {key}](img/{imgs[f'constant_{key}']})", ""]
    thr = results.get("throughput")
    if thr:
        lines += [f"### Batched throughput (cache {thr['cache']})", ""]
        lines += [
            "N sessions in one engine, each decoding; one `step()` is one batched forward over all of them. "
            "Tokens/s counts decode steps after every session's prompt is in. HF is `generate` with the same "
            f"batch size (dense cache) in the same dtype ({thr.get('dtype', 'float32')}); sinkserve runs "
            f"{thr.get('weights', 'dense')} weights (steps of more than 8 sessions use them de-quantized).",
            "",
        ]
        if thr.get("single_dense_tokens_per_s"):
            lines += [f"Single session on dense weights: {thr['single_dense_tokens_per_s']:.1f} tokens/s, "
                      f"{thr['single_dense_vs_hf']:.2f}x HF in the same dtype.", ""]
        if thr.get("hf_fp32_single_tokens_per_s"):
            lines += [f"Single session, HF `generate` in float32 (the checkpoint loaded with defaults): "
                      f"{thr['hf_fp32_single_tokens_per_s']:.1f} tokens/s; sinkserve is "
                      f"{thr['single_vs_hf_fp32']:.2f}x that.", ""]
        lines += _table(["sessions", "tokens/s", "scaling vs 1", "median step ms", "HF generate tokens/s",
                         "vs HF", "RSS MiB"],
                        [[r["sessions"], _num(r["tokens_per_s"], 1), f"{r['scaling_vs_1']:.2f}x",
                          _num(r["median_step_ms"], 1), _num(r["hf_batch_tokens_per_s"], 1),
                          f"{r['speedup_vs_hf_same_batch']:.2f}x", _num(r["rss_mib"], 0)] for r in thr["rows"]])
        if "throughput" in imgs:
            lines += [f"![throughput](img/{imgs['throughput']})", ""]
    return lines


def _profiles(profiles: dict) -> list[str]:
    if not profiles:
        return []
    lines = ["## Profiles", ""]
    for key, prof in profiles.items():
        lines += [f"### {prof['title']} (`{key}`)", ""]
        lines += [
            f"torch.profiler over {prof['steps']} steps, {prof['torch_threads']} threads: "
            f"{prof['wall_ms_per_step']:.1f} ms wall per step; operators {prof['operator_ms_per_step']:.1f} ms "
            f"(matmuls {prof['matmul_ms_per_step']:.1f} ms, attention {prof['attention_ms_per_step']:.1f} ms); "
            f"outside any operator (Python, bookkeeping) {prof['outside_operators_ms_per_step']:.1f} ms.",
            "",
        ]
        lines += _table(["operator", "calls", "self ms / step", "share"],
                        [[f"`{t['op']}`", t["calls"], _num(t["self_ms_per_step"], 2), f"{t['share'] * 100:.1f}%"]
                         for t in prof["top_ops"]])
    return lines


def _closing(results: dict) -> list[str]:
    lines = ["## Closing note", ""]
    targets = results.get("targets", [])
    met = [t for t in targets if t["met"] is True]
    missed = [t for t in targets if t["met"] is False]
    unchecked = [t for t in targets if t["met"] is None]
    lines.append(f"Met {len(met)} of {len(targets)} targets" + (f"; {len(unchecked)} not checked at this run's "
                                                              "length (quick mode)." if unchecked else "."))
    lines.append("")
    for t in met:
        lines.append(f"- met: {t['what']} — {t['measured']} (goal {t['target']}).")
    for t in missed:
        lines.append(f"- **missed**: {t['what']} — {t['measured']} (goal {t['target']}). {t.get('analysis', '')}")
    for t in unchecked:
        lines.append(f"- not checked: {t['what']} — {t['measured']} (goal {t['target']}).")
    lines.append("")
    return lines


def write_markdown(results: dict, imgs: dict, path: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `" + meta["command"] + "` — do not edit by hand; every number, table and plot below comes "
        "from that one run of sinkserve's own engine (and of HF transformers for the baselines), ratios measured "
        "side by side.",
        "",
        "Regenerate:",
        "",
        "```bash",
        "make bench          # full run (python -m benchmarks.run); long, shows progress",
        "make bench-quick    # python -m benchmarks.run --quick: smaller everything, under 10 minutes",
        "python -m benchmarks.run --text FILE   # perplexity on your own text",
        "```",
        "",
    ]
    if not meta.get("finished"):
        done = meta.get("sections_done") or []
        pending = [name for name in meta.get("sections", []) if name not in done]
        lines += [f"> **Run in progress or cut short.** Sections measured (the last possibly in part): "
                  f"{', '.join(done) or 'none'}; not measured: {', '.join(pending) or 'none'}.", ""]
    lines += _machine(meta)
    lines += _targets(results.get("targets", []))
    if results.get("quality"):
        lines += _quality(results["quality"], imgs)
    lines += _speed(results, imgs)
    lines += _profiles(results.get("profiles", {}))
    lines += _tensor_parallel(results.get("tensor_parallel"))
    lines += _closing(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
