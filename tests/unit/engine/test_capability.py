"""The execution paths chosen at start: auto by the CPU's features, an explicit setting always wins, a path whose
CPU feature is missing is refused naming it."""

from pathlib import Path

import pytest
import torch

from sinkserve.engine.capability import CpuFeatures, choose_paths, default_threads
from sinkserve.errors import InvalidArgument

CPU = torch.device("cpu")
AVX512_BF16 = CpuFeatures("Test EPYC", frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}), "AVX512", 2)
AMX = CpuFeatures("Test Xeon", frozenset({"avx2", "fma", "avx512f", "amx_tile", "amx_bf16"}), "AVX512", 4)
AVX2 = CpuFeatures("Test EPYC", frozenset({"avx2", "fma"}), "AVX2", 2)
PLAIN = CpuFeatures("Old CPU", frozenset({"sse4_2"}), "DEFAULT", 1)


@pytest.mark.parametrize("cpu,dtype,weights,rows", [
    (AVX512_BF16, "bfloat16", "int4", 8),
    (AMX, "bfloat16", "int4", 8),
    (AVX2, "float32", "dense", 0),  # bf16 is emulated there; int8 measured slower than float32 (docs)
    (PLAIN, "float32", "dense", 0),
])
def test_auto_picks_by_the_cpus_features(cpu, dtype, weights, rows):
    paths = choose_paths("auto", "auto", None, CPU, cpu, threads=2)
    assert (paths.dtype, paths.weights, paths.packed_max_rows) == (dtype, weights, rows)
    assert paths.chosen == "dtype auto, weights auto"
    assert dtype in paths.line() and cpu.model in paths.line()


@pytest.mark.parametrize("cpu", [AVX512_BF16, AVX2, PLAIN])
def test_an_explicit_dtype_always_wins(cpu):
    for dtype in ("float32", "bfloat16", "float16"):
        paths = choose_paths(dtype, "auto", None, CPU, cpu, threads=1)
        assert paths.dtype == dtype
        assert paths.weights == ("dense" if dtype == "float32" else "int4")
    assert choose_paths("float32", "dense", None, CPU, AVX512_BF16, threads=1).weights == "dense"
    assert choose_paths("bfloat16", "dense", None, CPU, AVX2, threads=1).prefill.endswith(
        "(emulated: this CPU has no AVX512-BF16/AMX)")


def test_an_explicit_weight_format_gets_a_dtype_it_can_run_with():
    assert choose_paths("auto", "int8", None, CPU, AVX512_BF16, threads=1).dtype == "float32"
    assert choose_paths("auto", "int4", None, CPU, AVX2, threads=1).dtype == "bfloat16"
    assert choose_paths("auto", "dense", None, CPU, AVX512_BF16, threads=1).dtype == "bfloat16"
    assert choose_paths("auto", "dense", None, CPU, AVX2, threads=1).dtype == "float32"
    assert choose_paths("float32", "int8", 32, CPU, AVX2, threads=1).packed_max_rows == 32


def test_a_path_needing_a_missing_feature_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match="needs AVX2"):
        choose_paths("float32", "int8", None, CPU, PLAIN, threads=1)
    with pytest.raises(InvalidArgument, match="int8 computes in float32"):
        choose_paths("bfloat16", "int8", None, CPU, AVX512_BF16, threads=1)
    with pytest.raises(InvalidArgument, match="int4 needs dtype bfloat16 or float16"):
        choose_paths("float32", "int4", None, CPU, AVX512_BF16, threads=1)


def test_a_gpu_gets_dense_weights_and_refuses_cpu_kernels():
    for weights in ("int4", "int8"):
        with pytest.raises(InvalidArgument, match="runs a CPU kernel"):
            choose_paths("auto", weights, None, torch.device("cuda"), AVX2, threads=1)


def test_cpu_features_are_read_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 fma avx512f "
                       "avx512_bf16 avx512_vnni amx_tile\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n")
    cpu = CpuFeatures.detect(cpuinfo)
    assert cpu.model == "Test CPU 9000" and cpu.bf16
    assert cpu.named_flags == ["AVX2", "FMA", "AVX512", "AVX512-BF16", "AVX512-VNNI", "AMX"]
    assert cpu.torch_capability == torch.backends.cpu.get_cpu_capability()


def test_threads_follow_the_affinity_and_rays_reservation(monkeypatch):
    import os

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == cpus
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a worker reserving 1 CPU
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cpus + 64))  # never past the affinity
    assert default_threads() == cpus
