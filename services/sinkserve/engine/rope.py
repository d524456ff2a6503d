"""Rotary position embeddings (the rotate-half convention of Llama and GPT-NeoX checkpoints)."""

from __future__ import annotations

import math

import torch

from sinkserve.errors import UnsupportedModel


def inv_frequencies(rot_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Per-pair inverse frequencies in float64, with the rope scalings checkpoints we load use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_context / low, old_context / high
        smooth = (old_context / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    if kind in ("longrope", "su"):
        # Phi-3 LongRoPE: per-pair divisors. HF takes long_factor when the sequence is longer than
        # original_max_position_embeddings and short_factor otherwise. Our positions are cache positions, below
        # sinks + window, and families using it cap the cache at original_max_position_embeddings
        # (ModelArgs.max_context), so short_factor is the one HF applies to every sequence the cache can hold.
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float64)
    if kind == "yarn":
        return _yarn_inv_frequencies(inv_freq, rot_dim, theta, scaling)
    raise UnsupportedModel(
        f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, longrope, yarn)"
    )


def _yarn_inv_frequencies(inv_freq: torch.Tensor, rot_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): pairs that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), pairs that turn more than beta_fast times are kept, and a linear ramp
    over the pair index blends the two in between. `truncate` (default true, as in HF) rounds the ramp's ends
    outward to whole pairs; gpt-oss sets it false."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def pair_for(rotations: float) -> float:  # the (fractional) pair index that turns `rotations` times
        return rot_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_for(beta_fast), pair_for(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp: avoid dividing by zero
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def yarn_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
    """YaRN's factor on cos/sin (HF's `attention_scaling`): the given attention_factor, else
    0.1 * ln(factor) + 1 (with mscale / mscale_all_dim when both are set; 1 when factor <= 1)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling.get("factor") or max_position_embeddings / float(scaling["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, float(scaling["mscale"])) / mscale(factor, float(scaling["mscale_all_dim"]))
    return mscale(factor)


def longrope_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
    """LongRoPE's factor on cos/sin (HF's `attention_scaling`): the given attention_factor, else
    sqrt(1 + ln(s) / ln(original context)) with s = max_position_embeddings / original context (1 when s <= 1)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_table(inv_freq: torch.Tensor, positions: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, positions): [positions, rot_dim], computed in float64 for accuracy."""
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def rope_for_offsets(inv_freq: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for arbitrary (possibly negative) integer offsets: [len(offsets), rot_dim]."""
    angles = torch.outer(offsets.to(torch.float64).cpu(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1).to(offsets.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half_sign(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., rot_dim] with rotate-half's sign folded in, for `apply_rope`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, pass_scale: float = 1.0):
    """Rotate the first rot_dim features of x [..., head_dim] (the rotate-half convention), in three operators:
    rotate_half(x) * sin == roll(x) * sin_signed. cos/sin_signed [..., rot_dim] broadcast against x as given
    (the caller adds the heads axis); features past rot_dim (GPT-NeoX partial rotary) are multiplied by
    `pass_scale` (the softmax scale when it is folded into a query's cos/sin)."""
    rot_dim = cos.shape[-1]
    if rot_dim == 0:  # a family without rotary (ALiBi): only the scale applies
        return x if pass_scale == 1.0 else x * pass_scale
    if rot_dim == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rot_dim // 2, -1), sin_signed)
    x_rot = x[..., :rot_dim]
    rotated = torch.addcmul(x_rot * cos, x_rot.roll(rot_dim // 2, -1), sin_signed)
    x_pass = x[..., rot_dim:] * pass_scale
    return torch.cat([rotated, x_pass.expand(rotated.shape[:-1] + x_pass.shape[-1:])], dim=-1)
