"""One short GPU check (under 8 minutes on one GPU), printing one JSON object:

- logits of the bundled model against HF transformers' own forward on the device (float32, no eviction);
- TP=1 against TP=N logits when the machine has N > 1 GPUs (N = --tensor-parallel, default: every GPU whose
  count splits the model);
- decode ms/token for one session at caches 256..4096 (a full cache each, greedy steps, synchronised timings);
- tok/s with 64 sessions decoding together.

`python -m benchmarks.gpu_check` on a GPU machine; `--device cpu --caches 256 --sessions 8` runs the same code
on a CPU (slowly, as a check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.tensor_parallel import _fill
from sinkserve.config import BUNDLED_MODEL, EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.step_inputs import RowInput
from sinkserve.engine.testing import random_ids
from sinkserve.engine.weights import resolve_checkpoint


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_decode(engine, slots: list[int], first: list[int], steps: int, device: str) -> float:
    runner, tokens = engine.runner, torch.tensor(first, device=runner_device(engine))
    for warm in (True, False):
        _sync(device)
        started = time.perf_counter()
        for _ in range(2 if warm else steps):
            ids = tokens.tolist()  # once per step, outside the layers: the rows are Python lists
            logits = runner.forward([RowInput(slot, [t], "last") for slot, t in zip(slots, ids)])
            tokens = torch.stack([row[-1] for row in logits]).argmax(-1)
        _sync(device)
    return (time.perf_counter() - started) / steps


def runner_device(engine) -> torch.device:
    return engine.runner.device


def logits_vs_hf(device: str, tokens: int = 96) -> dict:
    from transformers import AutoModelForCausalLM

    checkpoint = resolve_checkpoint(BUNDLED_MODEL)
    ids = random_ids(tokens, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    with torch.inference_mode():
        reference = hf(torch.tensor([ids], device=device)).logits[0].float().cpu()
    del hf
    engine = load_engine(EngineConfig(device=device, dtype="float32", weights="dense", sinks=4, window=1020, slots=1, prefill_chunk=32))
    ours = engine.stream_logits(ids).cpu()
    return {"tokens": tokens, "max_abs_diff": float((ours - reference).abs().max()), "ours": ours}


def tp_vs_tp1(device: str, world: int, ours_tp1: torch.Tensor, tokens: int) -> dict:
    engine = load_engine(EngineConfig(device=device, dtype="float32", weights="dense", sinks=4, window=1020, slots=1, prefill_chunk=32),
                         tensor_parallel=world)
    try:
        sharded = engine.stream_logits(random_ids(tokens, seed=1)).cpu()
    finally:
        engine.close()
    return {"tensor_parallel": world, "max_abs_diff_vs_tp1": float((sharded - ours_tp1).abs().max())}


def decode_latency(device: str, caches: list[int], steps: int, dtype: str) -> list[dict]:
    rows = []
    for cache in caches:
        engine = load_engine(EngineConfig(device=device, dtype=dtype, sinks=4, window=cache - 4, slots=1,
                                          prefill_chunk=256))
        ids = random_ids(cache + 1, seed=2)
        _fill(engine.runner, 0, ids[:cache], 256)
        rows.append({"cache": cache, "ms_per_token": round(_timed_decode(engine, [0], [ids[cache]], steps, device)
                                                           * 1e3, 3)})
        del engine
    return rows


def batched(device: str, sessions: int, steps: int, dtype: str, prefix: int = 64) -> dict:
    engine = load_engine(EngineConfig(device=device, dtype=dtype, sinks=4, window=252, slots=sessions,
                                      prefill_chunk=256))
    ids = random_ids(sessions * prefix, seed=3)
    for slot in range(sessions):
        _fill(engine.runner, slot, ids[slot * prefix : (slot + 1) * prefix], 256)
    seconds = _timed_decode(engine, list(range(sessions)), ids[:sessions], steps, device)
    return {"sessions": sessions, "tok_s": round(sessions / seconds, 1), "ms_per_step": round(seconds * 1e3, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script)")
    parser.add_argument("--tensor-parallel", type=int, default=None, help="shards for the TP check (default: 3 "
                        "when 3 or more GPUs are there: the bundled model splits in 1 or 3)")
    parser.add_argument("--caches", default="256,512,1024,2048,4096")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; --device cpu runs the check on the CPU")
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    started = time.perf_counter()
    out: dict = {"device": args.device, "gpus": gpus, "torch": torch.__version__,
                 "gpu_name": torch.cuda.get_device_name(0) if gpus else None}
    hf = logits_vs_hf(args.device)
    out["logits_vs_hf"] = {k: v for k, v in hf.items() if k != "ours"}
    world = args.tensor_parallel or (3 if gpus >= 3 else None)
    if world and world > 1:
        out["tp_vs_tp1"] = tp_vs_tp1(args.device, world, hf["ours"], hf["tokens"])
    out["decode"] = decode_latency(args.device, [int(c) for c in args.caches.split(",")], args.steps, args.dtype)
    out["batched"] = batched(args.device, args.sessions, max(4, args.steps // 2), args.dtype)
    out["dtype"] = args.dtype
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
