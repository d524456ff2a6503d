"""The physical limit: how fast this machine streams memory, and what that allows one decode step.

A decode step of a small model on a CPU must read every weight once and the session's KV cache once;
nothing else of that size is touched. So (weight bytes + KV bytes) / read bandwidth is a floor for the
step time, and the ratio of the measured step time to that floor says how much is left on the table.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm up: page in the buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """Large-array copy / read / fp32 GEMV, best of `repeats`, in GB/s (1e9 bytes/s)."""
    nbytes = mib * 2**20
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    # copy touches every byte twice (read src, write dst)
    copy_s = _best_seconds(lambda: dst.copy_(src), repeats)
    read_s = _best_seconds(lambda: src.sum(), repeats)

    src_np = np.ones(numel, dtype=np.float32)
    dst_np = np.empty_like(src_np)
    np_copy_s = _best_seconds(lambda: np.copyto(dst_np, src_np), repeats)

    # fp32 GEMV over a matrix the size of the buffer: the shape of a batch-1 decode step
    cols = 4096
    matrix = src.view(-1, cols)
    vector = torch.ones(cols, dtype=torch.float32)
    gemv_s = _best_seconds(lambda: torch.mv(matrix, vector), repeats)
    del src, dst, src_np, dst_np, matrix
    return {
        "buffer_mib": mib,
        "torch_threads": torch.get_num_threads(),
        "copy_gbps": 2 * nbytes / copy_s / 1e9,
        "numpy_copy_gbps": 2 * nbytes / np_copy_s / 1e9,
        "read_gbps": nbytes / read_s / 1e9,
        "gemv_fp32_gbps": nbytes / gemv_s / 1e9,
    }


def decode_floor_seconds(weight_bytes: int, kv_bytes: int, read_gbps: float) -> float:
    return (weight_bytes + kv_bytes) / (read_gbps * 1e9)
