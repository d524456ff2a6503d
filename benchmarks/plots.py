"""PNG plots for docs/benchmarks.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"streaming": "tab:blue", "dense": "tab:red", "recompute": "tab:orange", "window": "tab:gray",
          "hf": "tab:red", "floor": "black"}


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_long_stream(long: dict, path: Path, model: str = "SmolLM2-135M") -> str:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name in ("dense", "streaming"):
        bins = long[name]["bins"]
        xs = [(b["start"] + b["end"]) / 2 for b in bins]
        ax.plot(xs, [b["ppl"] for b in bins], marker="o", ms=3, color=COLORS[name],
                label=f"{name}" + (f" (cache {long['streaming_cache']})" if name == "streaming" else " (no eviction)"))
    ax.set_yscale("log")
    past = long["tokens"] > long["context_length"]
    if past:  # the line only where the stream reaches it (quick mode stops short)
        ax.axvline(long["context_length"], color="black", ls="--", lw=1)
        ax.text(long["context_length"], ax.get_ylim()[1], " pretraining length", va="top", fontsize=8)
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity per {long['bin_tokens']}-token bin (log)")
    ax.set_title(f"{model} past its pretraining length: dense vs StreamingLLM" if past else
                 f"{model}: dense vs StreamingLLM by position (stops short of the "
                 f"{long['context_length']:,}-token pretraining length)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def plot_latency(latency: dict, roofline: dict | None, path: Path, model: str = "SmolLM2-135M") -> str:
    rows = latency["rows"]
    sizes = [r["cache"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(sizes, [r["recompute"]["median_ms"] for r in rows], marker="s", color=COLORS["recompute"],
            label="sliding window + re-computation (sinkserve)")
    if all("hf_recompute" in r for r in rows):
        ax.plot(sizes, [r["hf_recompute"]["ms"] for r in rows], marker="s", ls=":", color=COLORS["recompute"],
                label="sliding window + re-computation (HF forward)")
    ax.plot(sizes, [r["hf_dense"]["median_ms"] for r in rows], marker="^", color=COLORS["hf"],
            label="dense, HF transformers generate")
    weights = latency.get("weights", "dense")
    ax.plot(sizes, [r["streaming"]["median_ms"] for r in rows], marker="o", color=COLORS["streaming"],
            label=f"StreamingLLM (sinkserve, {weights} weights)")
    if all("streaming_dense" in r for r in rows):
        ax.plot(sizes, [r["streaming_dense"]["median_ms"] for r in rows], marker="o", ls="--",
                color=COLORS["streaming"], label="StreamingLLM (sinkserve, dense weights)")
    if roofline:
        floor = [r for r in roofline["rows"] if r.get("weights", weights) == weights]
        ax.plot([r["cache"] for r in floor], [r["floor_ms"] for r in floor], ls="--", color=COLORS["floor"],
                label=f"floor: ({weights} weights + KV) / read bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("cache size (tokens attended)")
    ax.set_ylabel("ms per decoded token (log)")
    ax.set_title(f"Per-token decode latency, {model} {latency.get('dtype', 'float32')}, batch 1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_constant_cost(run: dict, path: Path) -> str:
    samples = run["samples"]
    xs = [s["tokens_seen"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    ax1.plot(xs, [s["decode_ms"] for s in samples], lw=1, color=COLORS["streaming"], label="the stream")
    if all("control_decode_ms" in s for s in samples):
        ax1.plot(xs, [s["control_decode_ms"] for s in samples], lw=1, color="tab:gray", alpha=0.8,
                 label="control: a fresh session with a full cache, timed at each sample")
        ax1.legend(fontsize=8, loc="lower right")
    ax1.set_ylabel("decode ms / token")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.set_title(f"Constant cost along {run['total_tokens']:,} tokens: {run['label']} (cache {run['cache']})")
    ax2.plot(xs, [s["rss_mib"] for s in samples], lw=1, color="tab:green")
    ax2.set_ylabel("process RSS (MiB)")
    ax2.set_ylim(0, max(s["rss_mib"] for s in samples) * 1.15)  # a flat line stays off the frame
    ax2.set_xlabel("tokens through the session")
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def plot_throughput(throughput: dict, path: Path, model: str = "SmolLM2-135M") -> str:
    rows = throughput["rows"]
    sessions = [r["sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sessions, [r["tokens_per_s"] for r in rows], marker="o", color=COLORS["streaming"],
            label="sinkserve engine (one batched step over all sessions)")
    ax.plot(sessions, [r["hf_batch_tokens_per_s"] for r in rows], marker="^", color=COLORS["hf"],
            label="HF transformers generate, same batch")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sessions, [str(s) for s in sessions])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("decode tokens / s (total)")
    ax.set_title(f"Batched decode throughput, {model} {throughput.get('dtype', 'float32')}, cache {throughput['cache']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_quality_tables(policies: dict, sinks: dict, path: Path) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    rows = policies["rows"]
    names = [r["policy"] for r in rows]
    ax1.bar(names, [r["ppl_common"] for r in rows], color=[COLORS[n] for n in names])
    ax1.set_yscale("log")
    ax1.set_ylabel("perplexity (log)")
    ax1.set_title(f"Cache policies, cache {policies['cache']}, {policies['common_tokens']} tokens", fontsize=9)
    srows = sinks["rows"]
    ax2.bar([str(r["sinks"]) for r in srows], [r["ppl"] for r in srows], color=COLORS["streaming"])
    ax2.set_yscale("log")
    ax2.set_xlabel("attention sinks")
    ax2.set_title(f"Sinks at cache {sinks['cache']}, {sinks['tokens']} tokens", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y", which="both")
    return _save(fig, path)
