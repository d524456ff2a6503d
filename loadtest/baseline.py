"""The engine on its own, in this process, at the batch a load run reached: what the stack could at best serve.

The load test runs it after the stack has stopped, on the same machine, with the engine settings the stack's
replicas ran (model, dtype, weights, cache, slots, torch threads) and turns of the same shape (the users'
messages, the same number of new tokens). ``batch`` sessions each get a message and generate ``max_tokens``
tokens (EOS ignored, so every turn is full length), all at once, as benchmarks/engine_runs.py drives it: open
sessions, add_message each, step until done, time the steps. The first round warms up (and leaves history in
every cache, as the chats have); the next rounds are measured:

- decode: steps in which every row decodes; tokens per second = rows / their time, ms per step (median);
- turn: the whole round, ingesting every message and decoding every reply, generated tokens / its time
  (what a batch of turns that all arrive at once costs the engine end to end).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

from loadtest.messages import SYSTEM_PROMPT, message


@dataclass(frozen=True)
class EngineSetup:
    """What the stack's replicas ran: the engine fields the baseline loads with."""

    model: str  # checkpoint directory
    dtype: str
    weights: str
    sinks: int
    window: int
    slots: int
    threads: int | None = None  # torch intra-op threads (the replica's); None: torch's default


def load(setup: EngineSetup):
    import torch

    from sinkserve.config import EngineConfig
    from sinkserve.engine import load_engine

    if setup.threads:
        torch.set_num_threads(setup.threads)
    config = EngineConfig(model=setup.model, dtype=setup.dtype, weights=setup.weights, device="cpu",
                          sinks=setup.sinks, window=setup.window, slots=setup.slots, num_threads=setup.threads)
    return load_engine(config)


def measure(engine, batch: int, max_tokens: int, rounds: int = 2, seed: int = 0) -> dict:
    """`rounds` rounds of `batch` concurrent turns; the first warms up, the rest are measured."""
    import torch

    from sinkserve.protocol import GenerationParams

    batch = max(1, min(batch, engine.slots))
    rng = random.Random(seed)
    sessions = [engine.open_session(system_prompt=SYSTEM_PROMPT) for _ in range(batch)]
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    decode_steps: list[float] = []  # seconds of steps whose rows all decode
    decode_rows = 0
    turn_s, turn_tokens, prefill_tokens = 0.0, 0, 0
    for round_index in range(rounds):
        for sid in sessions:
            engine.add_message(sid, message(rng, round_index + 1), params)
        measured = round_index > 0
        started = time.perf_counter()
        produced = 0
        while engine.has_work():
            t0 = time.perf_counter()
            outs = engine.step()
            elapsed = time.perf_counter() - t0
            stats = engine.last_step
            produced += sum(1 for o in outs if o.token_id is not None)
            if measured and stats is not None:
                prefill_tokens += stats.prefill_tokens
                if stats.prefill_tokens == 0 and stats.decode_rows:
                    decode_steps.append(elapsed)
                    decode_rows += stats.decode_rows
        if measured:
            turn_s += time.perf_counter() - started
            turn_tokens += produced
    for sid in sessions:
        engine.close_session(sid)
    decode_s = sum(decode_steps)
    return {
        "batch": batch,
        "max_tokens": max_tokens,
        "rounds_measured": rounds - 1,
        "torch_threads": torch.get_num_threads(),
        "decode_steps": len(decode_steps),
        "step_ms_p50": round(1000 * statistics.median(decode_steps), 2) if decode_steps else None,
        "step_ms_mean": round(1000 * decode_s / len(decode_steps), 2) if decode_steps else None,
        "decode_tokens_per_s": round(decode_rows / decode_s, 1) if decode_s else None,
        "turn_tokens_per_s": round(turn_tokens / turn_s, 1) if turn_s else None,
        "prefill_tokens_per_turn": round(prefill_tokens / max(1, batch * (rounds - 1)), 1),
    }


def engine_alone(setup: EngineSetup, batches: list[int], max_tokens: int, rounds: int = 2, progress=None,
                 other_threads: tuple[int, ...] = ()) -> dict:
    """Load the engine once and measure each batch size at the replica's thread count; then the largest batch
    again at each of `other_threads` (what the machine could give the engine with more torch threads).
    {"threads", "by_batch": {batch: figures}, "other_threads": {threads: figures}, ...}."""
    import torch

    load_started = time.perf_counter()
    engine = load(setup)
    loaded_s = time.perf_counter() - load_started
    threads = torch.get_num_threads()
    out: dict = {
        "threads": threads,
        "load_s": round(loaded_s, 1),
        "loadavg_before": round(os.getloadavg()[0], 2),
        "by_batch": {},
        "other_threads": {},
    }
    for batch in sorted(set(batches)):
        if progress:
            progress(f"engine alone ({threads} thread(s)): {batch} concurrent turns of {max_tokens} tokens ...")
        figures = measure(engine, batch, max_tokens, rounds)
        figures["loadavg_1m"] = round(os.getloadavg()[0], 2)
        out["by_batch"][str(figures["batch"])] = figures
    for count in sorted(set(other_threads) - {threads}):
        torch.set_num_threads(count)
        batch = max(batches)
        if progress:
            progress(f"engine alone ({count} thread(s)): {batch} concurrent turns of {max_tokens} tokens ...")
        figures = measure(engine, batch, max_tokens, rounds)
        figures["loadavg_1m"] = round(os.getloadavg()[0], 2)
        out["other_threads"][str(count)] = figures
    torch.set_num_threads(threads)
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure a recorded run's engine-alone baseline again on this machine (the stack is not started): at the
    batch each step reached, with the run's engine settings; the run's entry in docs/loadtest.json gets the new
    figures and the docs are rendered again."""
    import argparse
    import datetime as dt
    import json
    import tempfile
    from pathlib import Path

    from loadtest import report
    from loadtest.stack import prepare_model

    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline", description=main.__doc__)
    parser.add_argument("--run", required=True, help="run name in docs/loadtest.json")
    parser.add_argument("--docs-dir", type=Path, default=root / "docs")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--also-threads", type=int, nargs="*", default=None,
                        help="thread counts also measured at the largest batch (default: the replica's "
                             "OMP_NUM_THREADS as recorded)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per batch, the first one warm-up (default 2)")
    parser.add_argument("--note", default="", help="why it was measured again (kept with the figures)")
    args = parser.parse_args(argv)
    json_path = args.docs_dir / "loadtest.json"
    data = json.loads(json_path.read_text())
    run = data["runs"].get(args.run)
    if run is None:
        parser.error(f"no run {args.run!r} in {json_path}")
    cfg = run["config"]
    key = cfg.get("model_key") or ("smollm2" if cfg["model"].startswith("SmolLM2") else "tiny")
    batches = [b for b in (report.batch_reached(s) for s in run["steps"]) if b]
    if not batches:
        parser.error(f"run {args.run!r} has no step with a measured batch")
    also = args.also_threads if args.also_threads is not None else (
        [cfg["replica_omp_num_threads"]] if cfg.get("replica_omp_num_threads") else [])
    with tempfile.TemporaryDirectory(prefix="sinkserve-baseline-") as work:
        preset = prepare_model(key, Path(work), cfg.get("dtype") or "float32", cfg.get("weights") or "dense")
        setup = EngineSetup(model=str(preset.checkpoint), dtype=cfg.get("dtype") or "float32",
                            weights=cfg.get("weights") or "dense", sinks=cfg["sinks"], window=cfg["window"],
                            slots=cfg["slots"], threads=args.threads)
        started = time.perf_counter()
        result = engine_alone(setup, batches, cfg["max_tokens"], args.rounds,
                              progress=lambda m: print(f"[baseline] {m}", flush=True), other_threads=tuple(also))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["measured_again"] = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "note": args.note,
                                "command": "python -m loadtest.baseline " + " ".join(argv if argv is not None else sys.argv[1:])}
    run["engine_alone"] = result
    for step in run["steps"]:
        step.pop("engine_alone", None)
        report.attach_engine_alone(step, result)
    run["headline"] = next(s for s in run["steps"] if s["users"] == run["headline"]["users"])
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    report.replot(args.run, run, args.docs_dir, root)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    report.render_markdown(data, args.docs_dir / "loadtest.md")
    print(f"[baseline] wrote {json_path} and {args.docs_dir / 'loadtest.md'}")


if __name__ == "__main__":
    main()
