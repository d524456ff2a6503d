"""Weight-only quantization for CPU decode, in the bundled GGUF's own block formats.

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
"""

from __future__ import annotations

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

