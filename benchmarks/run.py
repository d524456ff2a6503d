"""`python -m benchmarks.run [--quick]`: run every benchmark, write docs/benchmarks.{md,json} and docs/img/*.png."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, Plan, load_average, load_text, log, machine_description

SECTIONS = ("bandwidth", "quality", "latency", "constant", "throughput", "profiles", "tensor_parallel")


class ContentionMonitor:
    """Samples, every few seconds, how many CPU cores processes other than this one keep busy."""

    def __init__(self, interval_s: float = 5.0) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self.interval_s = interval_s
        self.other_cores: list[float] = []
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _busy(self) -> tuple[float, float, float]:
        times = self._psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        mine = self._me.cpu_times()
        return time.monotonic(), busy, mine.user + mine.system + mine.children_user + mine.children_system

    def _run(self) -> None:
        prev = self._busy()
        while not self._stop.wait(self.interval_s):
            now = self._busy()
            elapsed = now[0] - prev[0]
            if elapsed > 0:
                self.other_cores.append(max((now[1] - prev[1]) - (now[2] - prev[2]), 0.0) / elapsed)
            self.loads.append(load_average())
            prev = now

    def start(self) -> "ContentionMonitor":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        cores = self.other_cores or [0.0]
        loads = self.loads or [load_average()]
        return {
            "other_cores_mean": sum(cores) / len(cores),
            "other_cores_max": max(cores),
            "load_min": min(loads),
            "load_max": max(loads),
        }


def _context_length(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def _analysis(target: dict, results: dict) -> str:
    """One or two sentences on what limits a missed target, from this run's own profile and bandwidth."""
    key = target["key"]
    profiles = results.get("profiles", {})
    bw = results.get("bandwidth", {})
    prof = profiles.get(target.get("limit_hint") or "")
    parts = []
    weight_ops = ("aten::_weight_int4pack_mm_for_cpu", "aten::mm", "aten::addmm", "aten::mv")
    ops = {t["op"]: t["self_ms_per_step"] for t in prof["top_ops"]} if prof else {}
    weight_ms = sum(ops.get(op, 0.0) for op in weight_ops)
    if prof:
        attention_ms = sum(ops.get(op, 0.0) for op in ("aten::bmm", "aten::_softmax", "aten::masked_fill_"))
        parts.append(
            f"Profile `{target['limit_hint']}` ({prof['title']}): {prof['wall_ms_per_step']:.1f} ms wall per "
            f"step; weight matmuls {weight_ms:.1f} ms, attention over the cache (`aten::bmm`, "
            f"softmax, masking) {attention_ms:.1f} ms, outside operators {prof['outside_operators_ms_per_step']:.1f} "
            f"ms; top operator `{prof['top_ops'][0]['op']}` ({prof['top_ops'][0]['share'] * 100:.0f}% of operator "
            "time)." if prof["top_ops"] else ""
        )
    roof = results.get("roofline")
    weights_format = results["meta"]["plan"].get("speed_weights", "dense")
    primary = [r for r in (roof or {}).get("rows", []) if r.get("weights", weights_format) == weights_format]
    if key in ("latency_streaming_abs", "roofline", "single_vs_hf") and primary and bw:
        weights = primary[0]["weight_bytes"]
        floor_ms = weights / (bw["read_gbps"] * 1e9) * 1e3
        verdict = ("the step is near that floor: memory bandwidth is the limit"
                   if prof and prof["wall_ms_per_step"] <= 2 * floor_ms else
                   "the step is far above that floor, so bandwidth is not what limits it: the operators above are")
        dtype = results["meta"]["plan"].get("speed_dtype", "float32")
        parts.append(
            f"Reading the weights a decode step uses ({weights_format}, {dtype} activations: {weights / 2**20:.0f} "
            f"MiB) once at the {bw['read_gbps']:.1f} GB/s measured in this run takes {floor_ms:.1f} ms; {verdict}."
        )
        if weight_ms:
            parts.append(
                f"The weight kernels stream them at {weights / (weight_ms / 1e3) / 1e9:.1f} GB/s in a decode step "
                f"(one activation row per session; a plain fp32 GEMV reaches {bw['gemv_fp32_gbps']:.1f} GB/s "
                "here), below what a reduction reads; the attention products and ~50 small operators per layer "
                "(each a few microseconds of dispatch at batch 1) make up the rest."
            )
    if key == "latency_streaming_abs" and len(primary) > 1:
        small, big = min(primary, key=lambda r: r["cache"]), max(primary, key=lambda r: r["cache"])
        floor_ratio = big["floor_ms"] / small["floor_ms"]
        parts.append(
            f"Flatness has a floor of its own: at cache {big['cache']} the session's KV is "
            f"{big['kv_bytes'] / 2**20:.0f} MiB against {big['weight_bytes'] / 2**20:.0f} MiB of weights, so even a "
            f"step at the bandwidth floor would take {floor_ratio:.2f}x the cache-{small['cache']} step; 1.2x is "
            "reachable only where the KV is small next to the weights."
        )
    if key == "single_vs_hf" and results.get("latency"):
        rows = results["latency"]["rows"]
        big = max(rows, key=lambda r: r["cache"])
        parts.append(
            f"sinkserve's lead grows with the cache ({big['hf_dense_over_streaming']:.2f}x HF at cache {big['cache']} "
            "in the latency table) and with the batch (throughput table); at a small cache and batch 1 both are "
            "bound by the weight kernels and per-operator dispatch."
        )
    if key == "throughput_64" and prof:
        parts.append("With 64 sessions each step is compute-bound on the matmuls (2 cores).")
    if key.startswith("constant_"):
        run = results.get("constant_cost", {}).get(key.removeprefix("constant_"), {})
        if run.get("fit_ratio") is not None:
            parts = [
                f"The ratio compares the median of {run['early_samples']} sample(s) in the first 10k tokens with "
                f"that of {run['late_samples']} in the last tenth, while single samples range "
                f"{run['decode_ms_p10']:.2f}..{run['decode_ms_p90']:.2f} ms (10th..90th percentile) along the "
                f"stream; a least-squares line through all {len(run['samples'])} samples moves "
                f"{(run['fit_ratio'] - 1) * 100:+.1f}% from 10k tokens to the end. RSS does not move."
            ]
            if run.get("over_control_fit_ratio") is not None:
                parts.append(
                    f"The control session (fresh, full cache, timed at every sample) moves "
                    f"{(run['control_fit_ratio'] - 1) * 100:+.1f}% over the same run, and the stream's time over the "
                    f"control's {(run['over_control_fit_ratio'] - 1) * 100:+.1f}% (median "
                    f"{run['over_control_median']:.3f}): "
                    + ("the drift is the machine's, not a cost that grows with the stream."
                       if abs(run["over_control_fit_ratio"] - 1) <= 0.05 else
                       "the stream itself got slower than the control.")
                )
        else:
            parts.append("See the plot: the ratio compares medians of the first 10k tokens and of the last tenth.")
    if key.startswith("ppl_") or key == "long_stream":
        parts.append("A model/text property, not a speed limit: see the tables.")
    contended = results["meta"].get("contended")
    if contended and not key.startswith("ppl_"):
        parts.append(f"Other processes kept {results['meta']['other_cores_mean']:.2f} cores busy on average "
                     "during this run (shared 2-core machine).")
    return " ".join(parts)


def rerender(out: Path) -> int:
    """Rewrite benchmarks.md and the plots from a run's own benchmarks.json (after a change to the report's
    wording or its derived statistics); no figure is measured again."""
    from benchmarks import plots, speed
    from benchmarks.report import write_json, write_markdown
    from benchmarks.targets import evaluate_targets

    results = json.loads((out / "benchmarks.json").read_text())
    label = "SmolLM2-135M" if results["meta"]["model_name"] == "smollm2-135m-instruct" else \
        Path(results["meta"]["model_name"]).name
    img_dir, imgs = out / "img", {}
    if "latency" in results:
        imgs["latency"] = plots.plot_latency(results["latency"], results.get("roofline"),
                                             img_dir / "latency_vs_cache.png", label)
    if "throughput" in results:
        imgs["throughput"] = plots.plot_throughput(results["throughput"], img_dir / "throughput.png", label)
    # the perplexity plots need per-token data the JSON leaves out: the run's own images stay
    for key, name in (("quality", "ppl_policies_sinks.png"), ("long", "ppl_long_stream.png")):
        if (img_dir / name).is_file():
            imgs[key] = name
    for key, run in results.get("constant_cost", {}).items():
        run.update(speed.flatness(run["samples"]))
        imgs[f"constant_{key}"] = plots.plot_constant_cost(
            run, img_dir / ("constant_cost_tiny.png" if key == "tiny" else "constant_cost_model.png"))
    results["meta"]["rerendered"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["targets"] = evaluate_targets(results)
    for target in results["targets"]:
        if target["met"] is False:
            target["analysis"] = _analysis(target, results)
    write_json(results, out / "benchmarks.json")
    write_markdown(results, imgs, out / "benchmarks.md")
    log(f"re-rendered {out / 'benchmarks.md'} from {out / 'benchmarks.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: finishes in under 10 minutes")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes: the harness's test
    parser.add_argument("--text", type=Path, default=None,
                        help="UTF-8 text for the perplexity runs (default: Python's pydoc_data.topics)")
    parser.add_argument("--model", default=None, help="bundled model name (default) or a checkpoint directory")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="where benchmarks.md/json and img/ go")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the speed sections and their HF baseline (quality always runs float32)")
    parser.add_argument("--weights", default="int4", choices=["int4", "dense"],
                        help="weights of the speed sections: int4 (the bundled GGUF's own 4-bit blocks, read by "
                        "decode steps; needs --dtype bfloat16) or dense; latency and throughput time dense too")
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite benchmarks.md and the plots in --out from its benchmarks.json, measuring nothing")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of sections: {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)

    if args.rerender:
        return rerender(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    if not sections:
        parser.error(f"--only names no section; choose from {', '.join(SECTIONS)}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.text is not None and not args.text.is_file():
        parser.error(f"--text {args.text}: no such file")

    from benchmarks import plots
    from benchmarks.report import write_json, write_markdown
    from benchmarks.targets import evaluate_targets
    from sinkserve.config import BUNDLED_MODEL
    from sinkserve.engine.weights import resolve_checkpoint

    plan = Plan.smoke() if args.smoke else Plan.quick() if args.quick else Plan.full()
    plan.speed_dtype = args.dtype
    plan.speed_weights = args.weights
    if args.weights == "int4" and args.dtype == "float32":
        parser.error("--weights int4 needs --dtype bfloat16 (torch's float32 int4 kernel is a slow reference path)")
    model = args.model or BUNDLED_MODEL
    model_label = "SmolLM2-135M" if model == BUNDLED_MODEL else Path(model).name
    checkpoint = resolve_checkpoint(model)
    text, text_source = load_text(args.text)
    command = "python -m benchmarks.run" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None
                                                                                    else sys.argv[1:]))
    started = time.time()
    results: dict = {
        "meta": {
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "machine": machine_description(),
            "plan": plan.as_dict(),
            "model_name": model,
            "checkpoint": str(checkpoint),
            "text_source": text_source,
            "sections": list(sections),
        }
    }
    out = args.out
    img_dir = out / "img"
    imgs: dict[str, str] = {}
    monitor = ContentionMonitor().start()

    section_marks: dict[str, int] = {}

    def mark(section: str) -> None:
        """Remember where `section` starts in the contention samples; close the previous one."""
        if section_marks:
            last = list(section_marks)[-1]
            part = monitor.other_cores[section_marks[last]:]
            results["meta"].setdefault("other_cores_by_section", {})[last] = (
                sum(part) / len(part) if part else None)
        section_marks[section] = len(monitor.other_cores)

    def flush(final: bool = False) -> None:
        results["meta"]["wall_s"] = time.time() - started
        usage = monitor.stop() if final else {
            "other_cores_mean": (sum(monitor.other_cores) / len(monitor.other_cores)) if monitor.other_cores else 0.0,
            "other_cores_max": max(monitor.other_cores, default=0.0),
            "load_min": min(monitor.loads, default=load_average()),
            "load_max": max(monitor.loads, default=load_average()),
        }
        results["meta"].update(usage)
        results["meta"]["contended"] = usage["other_cores_mean"] > 0.25
        # every flush follows a finished piece of work; the last section listed may still be partial
        results["meta"]["sections_done"] = [name for name in section_marks if name != "end"]
        if final:
            results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results["targets"] = evaluate_targets(results)
        for target in results["targets"]:
            if target["met"] is False:
                target["analysis"] = _analysis(target, results)
        write_json(results, out / "benchmarks.json")
        write_markdown(results, imgs, out / "benchmarks.md")

    hf_models: dict = {}

    def get_hf(dtype: str = plan.speed_dtype):
        if dtype not in hf_models:
            import torch

            from benchmarks.hf_baseline import HFBaseline

            log(f"loading the HF transformers baseline ({dtype})")
            hf_models[dtype] = HFBaseline(checkpoint, dtype=getattr(torch, dtype))
        return hf_models[dtype]

    # cheapest and most looked-at first: a run cut short still leaves the headline figures
    if "bandwidth" in sections:
        mark("bandwidth")
        from benchmarks.bandwidth import measure_bandwidth

        log("memory bandwidth")
        results["bandwidth"] = measure_bandwidth(plan.bandwidth_mib)
        flush()

    if "latency" in sections:
        mark("latency")
        from benchmarks import speed

        results["latency"] = speed.decode_latency(model, checkpoint, text, plan, get_hf())
        if "bandwidth" in results:
            results["roofline"] = speed.roofline(results["latency"], results["bandwidth"])
        imgs["latency"] = plots.plot_latency(results["latency"], results.get("roofline"),
                                             img_dir / "latency_vs_cache.png", model_label)
        flush()

    if "throughput" in sections:
        mark("throughput")
        from benchmarks import speed

        # HF in float32 too: what a user who loads the checkpoint with defaults would run
        results["throughput"] = speed.batched_throughput(model, plan, get_hf(), get_hf("float32"))
        imgs["throughput"] = plots.plot_throughput(results["throughput"], img_dir / "throughput.png", model_label)
        flush()

    if "profiles" in sections:
        mark("profiles")
        from benchmarks import profiles

        results["profiles"] = profiles.run_profiles(model, text, plan)
        flush()

    if "quality" in sections:
        mark("quality")
        from benchmarks import quality

        q = results.setdefault("quality", {})
        q["policies"] = quality.policies_table(model, text, plan)
        flush()
        q["sinks"] = quality.sinks_table(model, text, plan)
        flush()
        q["cache_sizes"] = quality.cache_size_table(model, text, plan, q["policies"]["_nlls"]["dense"])
        imgs["quality"] = plots.plot_quality_tables(q["policies"], q["sinks"], img_dir / "ppl_policies_sinks.png")
        flush()
        q["long"] = quality.long_stream(model, text, plan, _context_length(checkpoint))
        imgs["long"] = plots.plot_long_stream(q["long"], img_dir / "ppl_long_stream.png", model_label)
        flush()

    if "constant" in sections:
        mark("constant")
        from benchmarks import speed
        from sinkserve.engine.testing import make_tiny_checkpoint

        const = results.setdefault("constant_cost", {})
        with tempfile.TemporaryDirectory(prefix="sinkserve-bench-") as tmp:
            tiny = make_tiny_checkpoint(Path(tmp), arch="llama")
            const["tiny"] = speed.constant_cost(str(tiny), text, plan, plan.constant_tiny_tokens,
                                                plan.constant_tiny_probe_tokens, "tiny random Llama")
        imgs["constant_tiny"] = plots.plot_constant_cost(const["tiny"], img_dir / "constant_cost_tiny.png")
        flush()
        const["model"] = speed.constant_cost(model, text, plan, plan.constant_model_tokens,
                                               plan.constant_probe_tokens, model_label)
        imgs["constant_model"] = plots.plot_constant_cost(const["model"], img_dir / "constant_cost_model.png")
        flush()

    if "tensor_parallel" in sections:
        mark("tensor_parallel")
        from benchmarks import tensor_parallel

        log("tensor parallelism: TP=1 and TP=2 on this CPU")
        with tempfile.TemporaryDirectory(prefix="sinkserve-tp-") as tmp:
            steps = 4 if args.smoke else 16 if args.quick else 32
            shape = dict(layers=2, hidden=64) if args.smoke else {}
            results["tensor_parallel"] = tensor_parallel.measure(tensor_parallel.tp2_checkpoint(tmp, **shape), steps=steps,
                                                                 sessions=8 if args.smoke else 64)
        flush()

    mark("end")
    flush(final=True)
    log(f"done in {(time.time() - started) / 60:.1f} min: {out / 'benchmarks.md'}")
    for target in results["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        log(f"  {mark:>6}  {target['what']}: {target['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
