"""Shared pieces of the benchmark suites: the run plan (quick vs full), the text, the machine, timers."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Plan:
    """How much of each experiment to run. `full()` is what `make bench` runs; `quick()` is for development."""

    name: str
    # quality
    ppl_tokens: int  # tokens evaluated for the policy / sinks / cache-size tables
    ppl_cache: int  # sinks + window for the policy and sinks tables (the paper's Table 2 uses one fixed size)
    recompute_ppl_tokens: int  # recompute re-encodes the whole window per token: the slowest row
    cache_sizes_ppl: list[int]
    sink_counts: list[int]
    long_tokens: int  # the beyond-pretraining-length stream (dense vs streaming)
    long_cache: int
    ppl_chunk: int = 256
    cache_size_tokens: int = 0  # tokens for the cache-size table (0: ppl_tokens); must exceed the biggest cache
    long_chunk: int = 256
    # speed
    latency_cache_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    latency_decode_tokens: int = 32  # streaming and HF dense decode tokens per cache size
    latency_recompute_tokens: int = 6  # recompute costs seconds per token at 4096
    throughput_sessions: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    throughput_decode_steps: int = 32
    throughput_cache: int = 256
    constant_tiny_tokens: int = 1_000_000
    constant_model_tokens: int = 100_000
    constant_cache: int = 1024
    constant_message_tokens: int = 2048  # text fed per turn (chunked prefill) between decode probes
    constant_probe_tokens: int = 16  # decode tokens generated (and timed) per turn
    constant_tiny_probe_tokens: int = 64
    constant_max_minutes: float = 45.0  # wall-clock cap per constant-cost stream; the report states any shortfall
    bandwidth_mib: int = 512
    profile_steps: int = 5
    # dtype of the speed sections (latency, throughput, profiles, constant cost); quality runs float32
    speed_dtype: str = "bfloat16"
    # weights of the speed sections: int4 reads the bundled GGUF's own 4-bit blocks in decode steps (needs a
    # 16-bit dtype); the latency and throughput sections also time dense weights side by side
    speed_weights: str = "int4"

    @classmethod
    def full(cls) -> "Plan":
        return cls(
            name="full",
            ppl_tokens=2000,
            ppl_cache=256,
            recompute_ppl_tokens=1000,
            cache_sizes_ppl=[256, 512, 1024, 2048],
            cache_size_tokens=4096,
            sink_counts=[0, 1, 2, 4, 8],
            long_tokens=20_480,
            long_cache=1024,
            long_chunk=1020,
        )

    @classmethod
    def quick(cls) -> "Plan":
        # Every experiment, smaller: caches below the full run's, the long stream stops short of the
        # pretraining length, the latency sweep stops at 1024. Finishes in under 10 minutes.
        return cls(
            name="quick",
            ppl_tokens=400,
            ppl_cache=64,
            recompute_ppl_tokens=128,
            cache_sizes_ppl=[32, 64, 128],
            sink_counts=[0, 1, 4],
            long_tokens=1024,
            long_cache=128,
            ppl_chunk=128,
            long_chunk=128,
            latency_cache_sizes=[256, 512, 1024],
            latency_decode_tokens=6,
            latency_recompute_tokens=1,
            throughput_sessions=[1, 4, 16],
            throughput_decode_steps=6,
            constant_tiny_tokens=30_000,
            constant_model_tokens=2_000,
            constant_cache=256,
            constant_message_tokens=512,
            constant_probe_tokens=4,
            constant_tiny_probe_tokens=16,
            constant_max_minutes=2.0,
            bandwidth_mib=256,
            profile_steps=2,
        )

    @classmethod
    def smoke(cls) -> "Plan":
        """Minimal sizes: exercises every code path in about a minute (the harness's own test)."""
        return cls(
            name="smoke",
            ppl_tokens=160,
            ppl_cache=64,
            recompute_ppl_tokens=100,
            cache_sizes_ppl=[32, 64],
            sink_counts=[0, 4],
            long_tokens=320,
            long_cache=64,
            ppl_chunk=64,
            latency_cache_sizes=[64, 128],
            latency_decode_tokens=3,
            latency_recompute_tokens=2,
            throughput_sessions=[1, 4],
            throughput_decode_steps=3,
            throughput_cache=64,
            constant_tiny_tokens=3000,
            constant_model_tokens=600,
            constant_cache=128,
            constant_message_tokens=256,
            constant_probe_tokens=2,
            constant_tiny_probe_tokens=4,
            bandwidth_mib=64,
            profile_steps=1,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def default_text() -> tuple[str, str]:
    """The long English text every quality run uses by default: the stdlib's pydoc topics (offline, ~110k tokens)."""
    from pydoc_data import topics

    # Sorted keys: the same text on every machine with the same Python.
    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return text, f"Python {platform.python_version()} stdlib pydoc_data.topics ({len(text):,} characters)"


def load_text(path: Path | None) -> tuple[str, str]:
    if path is None:
        return default_text()
    text = path.read_text(encoding="utf-8", errors="replace")
    return text, f"{path} ({len(text):,} characters)"


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def load_average() -> float:
    return os.getloadavg()[0]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fresh_memory() -> None:
    gc.collect()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_description() -> dict:
    import torch
    import transformers

    from sinkserve.engine.capability import CpuFeatures, choose_paths

    cpu = CpuFeatures.detect()
    auto = choose_paths("auto", "auto", None, torch.device("cpu"), cpu, threads=torch.get_num_threads())
    return {
        "cpu": _cpu_model(),
        "cpu_flags": cpu.named_flags,
        "torch_cpu_capability": cpu.torch_capability,
        "auto_paths": auto.as_dict(),  # what dtype/weights auto would run here (the run's own paths are its args)
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "git_commit": _git_commit(),
    }


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
