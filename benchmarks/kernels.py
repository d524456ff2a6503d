"""Weight-format candidates for CPU decode, per linear layer of the bundled model: float32 dense, int8 (fbgemm,
engine/quant.py Int8Linear) and int4 (torch's packed kernel, bfloat16 activations), at the rows a step holds.

`python -m benchmarks.kernels [--threads N] [--json PATH]`: one table, the CPU it ran on, medians of interleaved
rounds. This is what `weights: auto` (engine/capability.py) was chosen from; rerun it on a new kind of CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.capability import CpuFeatures
from sinkserve.engine.quant import Int8Linear, PackedLinear, int8_kernel_available

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down, the output head (in -> out features)
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "head": (576, 49152)}
ROWS = (1, 8, 64)


def _median_ms(fn, x, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(threads: int, rounds: int = 3, reps: int = 10) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows_out = []
    for name, (k, n) in SHAPES.items():
        linear = nn.Linear(k, n, bias=False)
        candidates = {"float32 dense": lambda x, w=linear.weight: F.linear(x, w)}
        if int8_kernel_available():
            candidates["int8 (fbgemm)"] = Int8Linear(linear, max_rows=max(ROWS))
        packed = PackedLinear(linear, max_rows=max(ROWS)).to(torch.bfloat16)
        candidates["int4 (bf16 activations)"] = lambda x, m=packed: m(x.to(torch.bfloat16))
        for m in ROWS:
            x = torch.randn(m, k)
            times = {label: [] for label in candidates}
            for _ in range(rounds):  # interleaved: A B C A B C ...
                for label, fn in candidates.items():
                    times[label].append(_median_ms(fn, x, reps))
            rows_out.append({"layer": name, "rows": m, **{label: statistics.median(t) for label, t in times.items()}})
    return {"cpu": CpuFeatures.detect().as_dict(), "threads": threads, "rounds": rounds, "rows": rows_out}


def markdown(result: dict) -> str:
    labels = [key for key in result["rows"][0] if key not in ("layer", "rows")]
    lines = [f"CPU: {result['cpu']['model']}, flags {', '.join(result['cpu']['flags'])}, torch kernels "
             f"{result['cpu']['torch_capability']}; {result['threads']} thread(s), median of {result['rounds']} "
             "interleaved rounds, ms per call", "",
             "| layer | rows | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for row in result["rows"]:
        lines.append(f"| {row['layer']} | {row['rows']} | " + " | ".join(f"{row[label]:.3f}" for label in labels) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run(args.threads)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
