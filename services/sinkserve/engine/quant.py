"""Low-bit weights for CPU decode: int4 in the bundled GGUF's own block formats, and int8 for CPUs without BF16.

A decode step reads every weight once for one row per session, so its speed is the weights' size over the
memory bandwidth. torch's packed int4 kernel reads 4 bits per weight (plus 32 bits of scale and zero per 32)
instead of 16:
- linear layers, Q4_1 blocks: per 32 inputs w = q * d + m with q in 0..15. The kernel computes
  (q - 8) * scale + zero per group, so scale = d and zero = m + 8 d.
- the output head, Q8_0 blocks: per 32 inputs w = q * d with q in -127..127. q = 16 hi + lo (hi in -8..7,
  lo in 0..15) splits it into two int4 matrices side by side along the input, so one int4 product of the
  input written twice gives x @ (W_hi + W_lo)^T exactly.
A checkpoint de-quantized from such a GGUF (the bundled one) gets its blocks back exactly: each block's min and
max are among its values. Other checkpoints are rounded to nearest, i.e. quantized.

The kernel computes one row at a time, so steps with more rows than `max_rows` (prefill chunks, big batches)
run a plain GEMM on the de-quantized weights, which are the same values in the model dtype.

int8 (`Int8Linear`, for float32 models) was built for CPUs with AVX2 but no AVX512-BF16, where bf16 compute is
emulated and the int4 kernel gains little. Measured on such a CPU it beats float32 only in the output head at up to
8 rows (per-call work outside the GEMM costs more than the bytes it saves in the small layers), so `weights: auto`
never picks it; it stays an explicit choice (docs/cpu_paths.md). Weights in int8 per output channel
(w = q * scale, symmetric), read through fbgemm's int8 GEMM, which quantizes the activations on the fly and accumulates u8 x s8 products in int32,
then scales back to float32. fbgemm picks one activation scale per call, over all rows; each row is divided by its
own absolute maximum first and the output multiplied back, with one extra row [1, -1, 0, ...] pinning the call's
range to [-1, 1]: every row is quantized on the same grid whatever the other rows hold, so a session's numbers do
not depend on who shares its step (the engine's batching invariant), and each row uses the grid's whole range.
The grid has 7 bits (fbgemm's reduce_range, which keeps AVX2's 16-bit pair sums from saturating); a row's
remainder goes in as a second row on its own grid, so activations carry about 13 bits for twice the rows.
Steps of more than `max_rows` rows run a float32 GEMM on the de-quantized weights.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.models import embedding, output_head

GROUP = 32


def _groups(weight: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight.shape
    if in_features % GROUP:
        raise ValueError(f"int4 weights need in_features divisible by {GROUP}, got {in_features}")
    return weight.float().view(out_features, in_features // GROUP, GROUP)


def quantize_q4_1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (q int32 [N, K] in 0..15, scale [N, K/32], zero [N, K/32]) with w = (q - 8) * scale + zero."""
    groups = _groups(weight)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.clamp(torch.floor((groups - low) / safe + 0.5), 0, 15)
    return q.to(torch.int32).flatten(1), step.squeeze(-1), (low + 8 * step).squeeze(-1)


def quantize_q8_0_split(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q8_0 as two int4 halves: -> (q int32 [N, 2K], scale [N, 2K/32], zero [N, 2K/32]); the input goes twice."""
    groups = _groups(weight)
    step = groups.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round(groups / safe).clamp(-127, 127)
    high = torch.floor(q / 16)  # -8..7
    low = q - 16 * high  # 0..15
    step = step.squeeze(-1)
    q_int4 = torch.cat([(high + 8).flatten(1), low.flatten(1)], dim=1).to(torch.int32)
    scale = torch.cat([16 * step, step], dim=1)
    zero = torch.cat([torch.zeros_like(step), 8 * step], dim=1)
    return q_int4, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    out_features = q.shape[0]
    groups = (q.view(out_features, -1, GROUP).float() - 8) * scale[..., None] + zero[..., None]
    return groups.flatten(1)


class PackedLinear(nn.Module):
    """nn.Linear with int4-packed weights for steps of at most `max_rows` rows."""

    def __init__(self, linear: nn.Linear, max_rows: int, split_q8: bool = False):
        super().__init__()
        q, scale, zero = (quantize_q8_0_split if split_q8 else quantize_q4_1)(linear.weight.detach())
        self.max_rows, self.split_q8 = max_rows, split_q8
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [K / 32, N, 2]: the kernel's layout; cast to the model dtype with the module
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        dense = dequantize(q, scale, zero)
        if split_q8:
            dense = dense[:, : self.in_features] + dense[:, self.in_features :]
        self.weight = nn.Parameter(dense, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        if self.split_q8:
            x = torch.cat([x, x], dim=-1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, GROUP, self.scales_and_zeros)
        return out if self.bias is None else out + self.bias


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q int8 [N, K], scale float32 [N]) with w = q * scale, symmetric per output channel."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_kernel_available() -> bool:
    """fbgemm (the 'x86' or 'fbgemm' quantized engine) is built in and this CPU runs it (it needs AVX2)."""
    from sinkserve.engine.capability import CpuFeatures

    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and CpuFeatures.detect().avx2


class Int8Linear(nn.Module):
    """nn.Linear (float32) with int8 weights for steps of at most `max_rows` rows (module docstring)."""

    def __init__(self, linear: nn.Linear, max_rows: int):
        super().__init__()
        q, scale = quantize_int8(linear.weight)
        self.max_rows = max_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        # torch's quantized-tensor API is the only way into fbgemm's prepacked GEMM (deprecated, still in 2.13)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.weight = nn.Parameter(q.float() * scale[:, None], requires_grad=False)
        self.bias = linear.bias
        range_row = torch.zeros(1, self.in_features)
        range_row[0, 0], range_row[0, -1] = 1.0, -1.0
        self.register_buffer("range_row", range_row, persistent=False)

        # fbgemm's activation grid for that range (reduce_range: 7 bits, so u8 x s8 pair sums never saturate)
        self.grid_scale, self.grid_zero = torch._choose_qparams_per_tensor(range_row, True)

    def _on_grid(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows -> (grid values, per-row factor) with rows ~= values * factor; values are k * grid_scale with k in
        -63..63, which fbgemm quantizes exactly (its zero point is 64: -64 would reach below the pinned range)."""
        unit = rows.abs().amax(dim=-1, keepdim=True) / 63
        unit = torch.where(unit == 0, torch.ones_like(unit), unit)
        steps = torch.round(rows / unit)
        return steps * self.grid_scale, unit / self.grid_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        # 7 bits per activation lose too much (SmolLM2 perplexity +14%): each row goes in twice, as its value on
        # the grid and as the remainder on a grid of its own (~13 bits in all). One call: the weights, which are
        # what a decode step's time goes to, are read once for both.
        high, high_scale = self._on_grid(x)
        low, low_scale = self._on_grid(x - high * high_scale)
        rows = x.shape[0]
        out = torch.ops.quantized.linear_dynamic(torch.cat([high, low, self.range_row]), self._packed, True)
        out = out[:rows] * high_scale + out[rows:2 * rows] * low_scale
        return out if self.bias is None else out + self.bias


def quantize_model_int8(model: nn.Module, max_rows: int) -> None:
    """Swap the model's linear layers for Int8Linear in place (float32 model); the output head too, and a tied
    embedding is re-tied to the head's de-quantized weights, so the lookup reads the same values."""
    head, table = output_head(model), embedding(model)
    tied = head.weight is table.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = Int8Linear(child, max_rows)
                setattr(parent, name, packed)
                if child is head and tied:
                    table.weight = packed.weight


def quantize_model(model: nn.Module, max_rows: int) -> None:
    """Swap the model's linear layers for PackedLinear in place (before the cast to the model dtype).

    The output head gets Q8_0 blocks: it is what GGUF files keep at 8 bits (and, tied, the embedding table).
    A tied embedding is re-tied to the head's de-quantized weights, so the lookup reads the same values.
    """
    head, table = output_head(model), embedding(model)
    tied = head.weight is table.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = PackedLinear(child, max_rows, split_q8=child is head)
                setattr(parent, name, packed)
                if child is head and tied:
                    table.weight = packed.weight

