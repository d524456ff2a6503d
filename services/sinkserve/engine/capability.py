"""What this machine offers, and the execution paths the engine takes on it (dtype, weight format per step kind).

Chosen once at start. `dtype: auto` / `weights: auto` take the fastest path measured on that kind of machine that
passes the quality checks (docs/cpu_paths.md):
- a CPU with AVX512-BF16 or AMX-BF16: bfloat16 with int4 weights for decode steps (torch's packed int4 kernel),
  bfloat16 dense GEMMs for prefill;
- a CPU without BF16 instructions (AVX2 + FMA, or less), where bfloat16 is emulated (prefill 4.5x slower than
  float32): float32 dense. The int8 format (fbgemm's int8 GEMM, engine/quant.py) was measured there and lost to
  float32 except in the output head at up to 8 rows (docs/cpu_paths.md): it stays an explicit choice;
- CUDA: bfloat16 (float16 where the GPU lacks bf16) dense.
An explicit `dtype` or `weights` always wins; one that needs a feature this machine lacks is refused at start
with the feature named.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sinkserve.errors import InvalidArgument

# /proc/cpuinfo flag -> how reports name it (the kernels torch picks differ between these).
CPU_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX512",
    "avx512_bf16": "AVX512-BF16",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}

# Rows up to which a step runs on the low-bit weights, by format (config: packed_max_rows overrides).
PACKED_MAX_ROWS = {"int4": 8, "int8": 8, "dense": 0}


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]  # raw /proc/cpuinfo flags
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    cpus: int  # logical CPUs this process may run on (its affinity)

    @classmethod
    def detect(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> "CpuFeatures":
        model, flags = "unknown CPU", frozenset()
        try:
            text = cpuinfo.read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
        return cls(model, flags, torch.backends.cpu.get_cpu_capability(), affinity_cpus())

    @property
    def bf16(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def avx2(self) -> bool:
        # torch's own dispatch must agree: it may be built or capped (ATEN_CPU_CAPABILITY) below the CPU
        return "avx2" in self.flags and self.torch_capability in ("AVX2", "AVX512")

    @property
    def named_flags(self) -> list[str]:
        return [name for flag, name in CPU_FLAGS.items() if flag in self.flags]

    def describe(self) -> str:
        flags = ", ".join(self.named_flags) or "none of AVX2/AVX512/AMX"
        return f"{self.model}, {self.cpus} logical CPUs, flags: {flags}, torch kernels: {self.torch_capability}"

    def as_dict(self) -> dict:
        return {"model": self.model, "cpus": self.cpus, "flags": self.named_flags,
                "torch_capability": self.torch_capability, "bf16_native": self.bf16}


def affinity_cpus() -> int:
    """Logical CPUs this process may run on: its affinity mask (a container's or Ray's pinning), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch threads when the config leaves them unset: the CPUs Ray reserved for this worker (it sets
    OMP_NUM_THREADS to its num_cpus), never more than the affinity allows. Outside Ray: the affinity."""
    cpus = affinity_cpus()
    reserved = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cpus, int(reserved))) if reserved.isdigit() and int(reserved) > 0 else cpus


@dataclass(frozen=True)
class ExecutionPaths:
    """What the engine runs: one value, logged at start, in the replica's load report and its metrics."""

    device: str
    dtype: str
    weights: str
    packed_max_rows: int
    decode: str  # the kernel path of decode steps (at most packed_max_rows rows)
    prefill: str  # the kernel path of bigger steps (prefill chunks, big batches)
    chosen: str  # "auto" or "explicit", per setting: "dtype auto, weights explicit"
    cpu: str  # CpuFeatures.describe(), or the GPU's name
    threads: int
    cpu_capability: str = ""  # torch's CPU kernel level (AVX512, AVX2, DEFAULT); "" off the CPU

    def line(self) -> str:
        return (f"engine paths: {self.dtype}, {self.weights} weights on {self.device} ({self.chosen}); "
                f"decode: {self.decode}; prefill: {self.prefill}; {self.threads} thread(s); {self.cpu}")

    def as_dict(self) -> dict:
        return asdict(self)


def _kernel(dtype: str, weights: str, max_rows: int) -> tuple[str, str]:
    dense = f"{dtype} dense GEMM"
    if weights == "int4":
        return f"int4 packed GEMV ({dtype} activations), steps <= {max_rows} rows", dense
    if weights == "int8":
        return f"int8 fbgemm GEMM (float32 activations, per-row scales), steps <= {max_rows} rows", dense
    return dense, dense


def choose_paths(dtype: str, weights: str, packed_max_rows: int | None, device: torch.device,
                 cpu: CpuFeatures | None = None, threads: int | None = None) -> ExecutionPaths:
    """Resolve `auto` settings for this device and CPU; refuse an explicit path the machine cannot run."""
    chosen = f"dtype {'auto' if dtype == 'auto' else 'explicit'}, weights {'auto' if weights == 'auto' else 'explicit'}"
    if device.type == "cuda":
        if weights in ("int4", "int8"):
            raise InvalidArgument(f"weights={weights} runs a CPU kernel; device {device} needs weights=dense")
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        weights = "dense"
        name = torch.cuda.get_device_name(device)
        decode, prefill = _kernel(dtype, weights, 0)
        return ExecutionPaths(str(device), dtype, weights, 0, decode, prefill, chosen, name, threads or 1)
    if device.type != "cpu":
        if weights in ("int4", "int8"):
            raise InvalidArgument(f"weights={weights} runs a CPU kernel; device {device} needs weights=dense")
        dtype, weights = ("float32" if dtype == "auto" else dtype), "dense"
        decode, prefill = _kernel(dtype, weights, 0)
        return ExecutionPaths(str(device), dtype, weights, 0, decode, prefill, chosen, device.type, threads or 1)

    cpu = cpu or CpuFeatures.detect()
    if weights == "auto":
        if dtype == "auto":
            weights = "int4" if cpu.bf16 else "dense"
        elif dtype == "float32":
            weights = "dense"
        else:  # bfloat16 / float16 asked for: the int4 kernel computes in them
            weights = "int4"
    if dtype == "auto":
        if weights == "int8" or (weights == "dense" and not cpu.bf16):
            dtype = "float32"
        else:  # int4 needs a 16-bit dtype; bf16 is native here or, without BF16, still the kernel's best
            dtype = "bfloat16"
    if weights == "int8":
        if not cpu.avx2:
            raise InvalidArgument(
                "weights=int8 runs fbgemm's int8 GEMM, which needs AVX2: this CPU's flags lack avx2 "
                f"(torch kernels: {cpu.torch_capability}); use weights=dense")
        if dtype != "float32":
            raise InvalidArgument("weights=int8 computes in float32 (fbgemm's int8 GEMM): it needs dtype float32")
    if weights == "int4" and dtype == "float32":
        raise InvalidArgument("weights=int4 needs dtype bfloat16 or float16")
    max_rows = PACKED_MAX_ROWS[weights] if packed_max_rows is None else packed_max_rows
    decode, prefill = _kernel(dtype, weights, max_rows)
    if dtype in ("bfloat16", "float16") and not cpu.bf16:
        prefill += " (emulated: this CPU has no AVX512-BF16/AMX)"
    return ExecutionPaths("cpu", dtype, weights, max_rows, decode, prefill, chosen, cpu.describe(),
                          threads or default_threads(), cpu.torch_capability)
