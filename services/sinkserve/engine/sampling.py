"""Batched sampling: greedy, temperature, top-k, top-p, repetition penalty, per-session seeds.

Randomness is counter-based: the noise for a session's n-th sampled token is a hash of (seed, n,
vocab index), so a seeded session reproduces its tokens whatever else shares the batch, with no
per-session generator objects and no Python loop over sessions.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer mix (xorshift-multiply); multipliers < 2**31 keep int64 products from overflowing.
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniforms in (0, 1), a pure function of (seed, counter, index)."""
    index = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    row = _hash32(seeds * 0x27D4EB2D + _hash32(counters))  # [B]
    bits = _hash32(row[:, None] * 0x165667B1 + index[None, :]) & 0xFFFFFF
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor,
    seen_tokens: torch.Tensor | None,
    seeds: torch.Tensor,
    counters: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V]; per-row parameters [B]; seen_tokens [B, K] ids (-1 = none) for the penalty.
    Returns the sampled token ids [B]."""
    logits = logits.float()
    if seen_tokens is not None and bool((repetition_penalty != 1.0).any()):
        # HF convention: divide positive logits, multiply negative ones, for tokens already present.
        present = torch.zeros_like(logits, dtype=torch.bool)
        present.scatter_(1, seen_tokens.clamp(min=0), seen_tokens >= 0)
        penalty = repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(present, penalised, logits)

    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)

    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if bool(((top_k > 0) | (top_p < 1.0)).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    # Gumbel-max: argmax(logits/T + G) is a sample from softmax(logits/T).
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, counters, scaled.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
