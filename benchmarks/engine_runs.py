"""Building blocks that drive sinkserve's own engine: load with a cache geometry, time decode steps, profile."""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.common import median


@dataclass(frozen=True)
class Geometry:
    """A cache policy at a cache size: what `sinks` and `window` mean for each policy."""

    policy: str
    cache: int  # keys a token attends to at most (sinks + window); for dense, the capacity
    sinks: int = 4

    def engine_fields(self) -> dict:
        if self.policy == "dense":
            return {"policy": "dense", "sinks": 0, "window": 1, "max_context": self.cache}
        if self.policy == "window":
            return {"policy": "window", "sinks": 0, "window": self.cache}
        if self.policy == "recompute":
            # The paper's "sliding window with re-computation" has no sinks: the re-encoded window's own first
            # tokens play that role. Same number of keys per token as the other policies.
            return {"policy": "recompute", "sinks": 0, "window": self.cache}
        return {"policy": "streaming", "sinks": self.sinks, "window": self.cache - self.sinks}

    @property
    def label(self) -> str:
        if self.policy == "streaming":
            return f"{self.policy} ({self.sinks}+{self.cache - self.sinks})"
        return f"{self.policy} ({self.cache})"


def load(model: str, geometry: Geometry, slots: int = 1, dtype: str = "float32", **overrides):
    from sinkserve.config import EngineConfig
    from sinkserve.engine import load_engine

    fields = dict(model=model, dtype=dtype, device="cpu", slots=slots)
    fields.update(geometry.engine_fields())
    fields.update(overrides)
    return load_engine(EngineConfig(**fields))


def decode_step_times(engine, session_id: str, message: str, decode_tokens: int) -> dict:
    """Send `message`, generate `decode_tokens` + 1 tokens; time every step after the first token.

    The step that yields the first token also ingests the message, so it is reported apart as prefill.
    """
    from sinkserve.protocol import GenerationParams

    engine.add_message(session_id, message, GenerationParams(max_tokens=decode_tokens + 1, ignore_eos=True))
    prefill_s = 0.0
    decode_s: list[float] = []
    decode_cpu_s: list[float] = []  # CPU time of this process (all threads): what contention cannot inflate
    produced = 0
    while engine.has_work():
        start, cpu_start = time.perf_counter(), time.process_time()
        outs = engine.step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        mine = [o for o in outs if o.session_id == session_id and o.token_id is not None]
        if produced == 0:
            prefill_s += elapsed
        elif mine:
            decode_s.append(elapsed)
            decode_cpu_s.append(cpu)
        produced += len(mine)
    return {"prefill_s": prefill_s, "step_s": decode_s, "median_step_s": median(decode_s),
            "median_cpu_s": median(decode_cpu_s), "tokens": produced}


def fill_session(engine, session_id: str, token_ids: list[int]) -> str:
    """A session whose cache is already full: rebuilt from a transcript (its tail re-ingested on the next step)."""
    engine.import_session(session_id, list(token_ids))
    return session_id


def profile_steps(engine, steps: int, run_step=None, row_limit: int = 12) -> dict:
    """torch.profiler over `steps` engine steps: the top operators by self CPU time, and where time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run_step = run_step or engine.step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall_start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = time.perf_counter() - wall_start
    averages = prof.key_averages()
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self_us = sum(e.self_cpu_time_total for e in averages)
    top = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total_self_us if total_self_us else 0.0,
        }
        for e in rows[:row_limit]
    ]
    matmul_ops = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::mv",
                  "aten::_weight_int4pack_mm_for_cpu"}
    attention_ops = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                     "aten::_scaled_dot_product_attention_math", "aten::softmax", "aten::_softmax"}
    matmul_ms = sum(e.self_cpu_time_total for e in averages if e.key in matmul_ops) / 1e3 / steps
    attention_ms = sum(e.self_cpu_time_total for e in averages if e.key in attention_ops) / 1e3 / steps
    ops_ms = total_self_us / 1e3 / steps
    step_ms = wall * 1e3 / steps
    return {
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "wall_ms_per_step": step_ms,
        "operator_ms_per_step": ops_ms,
        "matmul_ms_per_step": matmul_ms,
        "attention_ms_per_step": attention_ms,
        # wall time no operator accounts for: Python, the engine's bookkeeping, sampling glue
        "outside_operators_ms_per_step": max(step_ms - ops_ms, 0.0),
        "top_ops": top,
    }
