"""Tensor parallelism on this machine: decode ms/token (one session, cache 256) and 64-session tok/s at TP=1 and
TP=2, with the embedding/head vocab-parallel (the engine's choice) and replicated (the alternative).

The bundled SmolLM2 (9 heads, 3 KV heads) splits only in 3, more shards than this machine's 2 cores; the
section runs a random-weight Llama of its size class that splits in 2: 30 layers, hidden 512, 8 heads, 4 KV
heads (head_dim 64), FFN 1024, SmolLM2's 49152-token vocabulary with tied embeddings, float32.

On a 2-core CPU TP=2 is expected to be slower than TP=1: the two shards split the same two cores, and every
decode step adds two all-reduces per layer, the embedding's all-reduce, the logits' gather and the broadcast of
the step's rows (gloo over loopback TCP), plus Python dispatch on both ranks. The section measures that
overhead; it says nothing about GPUs, where each shard has a device of its own.

`python -m benchmarks.tensor_parallel [--steps N]` prints the JSON; `make bench` runs it as a section.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.step_inputs import RowInput
from sinkserve.engine.testing import random_ids

VARIANTS = (("TP=1", 1, True), ("TP=2 vocab-parallel", 2, True), ("TP=2 replicated embedding/head", 2, False))


def _decode_steps(runner, slots: list[int], first: list[int], steps: int) -> float:
    """Seconds per decode step over `slots` (one greedy token each a step, fed back)."""
    tokens = list(first)
    started = time.perf_counter()
    for _ in range(steps):
        logits = runner.forward([RowInput(slot, [token], "last") for slot, token in zip(slots, tokens)])
        tokens = torch.stack([row[-1] for row in logits]).argmax(-1).tolist()
    return (time.perf_counter() - started) / steps


def _fill(runner, slot: int, ids: list[int], chunk: int) -> None:
    for start in range(0, len(ids), chunk):
        runner.forward([RowInput(slot, ids[start : start + chunk], "none")])


def tp2_checkpoint(directory, layers: int = 30, hidden: int = 512) -> str:
    from sinkserve.engine.testing import make_tiny_checkpoint

    return str(make_tiny_checkpoint(directory, arch="llama", layers=layers, hidden=hidden, heads=8, kv_heads=4))


def measure(model: str, steps: int = 32, sessions: int = 64, cache: int = 256,
            batch_prefix: int = 32, dtype: str = "float32") -> dict:
    rows = []
    cpu_count = len(os.sched_getaffinity(0))
    for label, world, vocab_parallel in VARIANTS:
        if world > cpu_count:
            rows.append({"variant": label, "skipped": f"needs {world} CPUs, this machine has {cpu_count}"})
            continue
        config = EngineConfig(model=model, dtype=dtype, device="cpu", sinks=4, window=cache - 4, slots=sessions,
                              prefill_chunk=128)
        engine = load_engine(config, tensor_parallel=world, vocab_parallel=vocab_parallel)
        try:
            runner = engine.runner
            ids = random_ids(cache + sessions * batch_prefix + 1, seed=11, vocab=runner.vocab_size)
            _fill(runner, 0, ids[:cache], 128)  # one session with a full cache
            one = _decode_steps(runner, [0], [ids[cache]], steps)
            runner.reset_slot(0)
            for slot in range(sessions):  # 64 sessions with a short context each
                _fill(runner, slot, ids[slot * batch_prefix : (slot + 1) * batch_prefix], 128)
            many = _decode_steps(runner, list(range(sessions)), ids[:sessions], max(4, steps // 4))
            stats = runner.shard_stats() if world > 1 else [{"parameter_bytes": sum(
                p.nbytes for p in {p.data_ptr(): p for p in runner.model.parameters()}.values())}]
        finally:
            engine.close()
        rows.append({
            "variant": label, "tensor_parallel": world, "vocab_parallel": vocab_parallel,
            "decode_ms_per_token": round(one * 1e3, 2), f"tok_s_{sessions}_sessions": round(sessions / many, 1),
            "parameter_mib_per_shard": [round(s["parameter_bytes"] / 2**20, 1) for s in stats],
        })
    label = model
    if "sinkserve-tp-" in model:
        shape = json.loads((Path(model) / "config.json").read_text())
        label = (f"random Llama {shape['num_hidden_layers']} layers x {shape['hidden_size']}, 8 heads / 4 KV heads, "
                 "vocab 49152")
    return {"model": label, "dtype": dtype, "cache": cache, "sessions": sessions, "steps": steps,
            "threads_per_shard": "cpus / tensor_parallel", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tensor_parallel", description=__doc__)
    parser.add_argument("--model", default=None, help="a checkpoint that splits in 2 (default: the random one)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps (one session)")
    parser.add_argument("--sessions", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sinkserve-tp-") as tmp:
        model = args.model or tp2_checkpoint(tmp)
        print(json.dumps(measure(model, args.steps, args.sessions), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
