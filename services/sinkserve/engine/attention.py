"""Sink-window attention over the KV slab for one batched step.

A step's tokens are flattened to `[N, ...]` for the linear layers (no padding there). Attention runs per
group of sessions: a decode group (one query per session) and a prefill group (chunks padded to the
longest). Every query sees, in cache positions:
  - the slot's sink entries (keys in the cache frame),
  - the slot's ring entries still inside its window (keys in the window frame),
  - the earlier tokens of its own chunk (both frames computed; the mask picks the right one).
The chunk is written into the slab only after attention, so a chunk that wraps the ring never hides
entries from the earlier queries of the same chunk.

Decode rows (one query per session, the common case) take a shorter path: both rotations of the query
against the whole slot in one product, the sink columns read from the cache-frame rows and the ring columns
from the window-frame rows; the token's own key is a plain dot product, since RoPE scores depend only on the
distance and that is zero in either frame. Reading the slot as one contiguous block is what keeps the slab
from being copied per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.rope import apply_rope


@dataclass
class AttnGroup:
    slots: torch.Tensor  # [B] slot index per row
    slot_range: tuple[int, int] | None  # (start, stop) when slots are contiguous: slab slices, no copy
    tokens: torch.Tensor  # [B, T] flat token index per (row, query); padding points at row N (zeros)
    valid: torch.Tensor  # [B, T] bool: real query
    # prefill: bool [B, T, sinks + T + window + T]; decode: float32 0 / -inf [B, sinks + window + 1] (self last)
    mask: torch.Tensor
    single_query: bool  # T == 1 and every row valid: the decode path
    # No sinks and nothing in any row's ring (recompute re-encodes, a window session's first chunk): the chunk
    # attends causally to itself only, and the fused attention kernel does it without a [T x T] score tensor.
    chunk_only: bool = False
    attn_mask: torch.Tensor | None = None  # sink-less prefill: `mask` laid out for the fused kernel (first layer)
    ring_used: int = 0  # ring entries [0, ring_used) can hold keys for some row (the rest were never written)


@dataclass
class StepBatch:
    """Everything the layers need for one step; built once, shared by every layer."""

    token_ids: torch.Tensor  # [N]
    cos_cache: torch.Tensor  # [N, rot_dim] rotation by cache position (against sinks)
    sin_cache: torch.Tensor
    cos_window: torch.Tensor  # [N, rot_dim] rotation by window-frame position (against the ring)
    sin_window: torch.Tensor
    cos_store: torch.Tensor  # [N, rot_dim] the frame each key is stored in: cache for sinks, window otherwise
    sin_store: torch.Tensor
    write_slot: torch.Tensor  # [N]
    write_entry: torch.Tensor  # [N] entry index inside the slot
    groups: list[AttnGroup]
    logits_index: torch.Tensor  # [M] flat indices whose logits the step returns


def sink_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slab: KVSlab, layer: int, batch: StepBatch
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] (not yet rotated) -> attention output [N, Hq, D]; writes k/v to the slab."""
    q_cache = apply_rope(q, batch.cos_cache, batch.sin_cache)
    q_window = apply_rope(q, batch.cos_window, batch.sin_window)
    out = q.new_empty(q.shape)
    chunk_keys = None
    for group in batch.groups:
        if group.single_query:
            _decode_attention(out, q, k, v, q_cache, q_window, slab, layer, group)
            continue
        if chunk_keys is None:  # prefill chunks attend to their own keys in both frames
            chunk_keys = (apply_rope(k, batch.cos_cache, batch.sin_cache),
                          apply_rope(k, batch.cos_window, batch.sin_window))
        _group_attention(out, q_cache, q_window, *chunk_keys, v, slab, layer, group)
    # Sink tokens are stored in the cache frame, window tokens in the window frame.
    k_store = apply_rope(k, batch.cos_store, batch.sin_store)
    slab.k[layer, batch.write_slot, :, batch.write_entry] = k_store
    slab.v[layer, batch.write_slot, :, batch.write_entry] = v
    return out


def _slot_block(cache: torch.Tensor, layer: int, group: AttnGroup) -> torch.Tensor:
    """The group's slots of one layer, [B, Hkv, sinks + window, D]: a view when the slots are contiguous."""
    if group.slot_range is not None:
        start, stop = group.slot_range
        return cache[layer, start:stop]
    return cache[layer].index_select(0, group.slots)


def _decode_attention(out, q, k, v, q_cache, q_window, slab: KVSlab, layer: int, group: AttnGroup) -> None:
    sinks = slab.geometry.sinks
    rows = group.tokens[:, 0]
    batch, n_heads, head_dim = len(rows), q.shape[1], q.shape[2]
    n_kv = k.shape[1]
    per_kv = n_heads // n_kv
    # [B, Hkv, 2 * per_kv, D]: cache-frame queries then window-frame queries (GQA without repeating K/V)
    q_both = torch.cat(
        [q_cache.index_select(0, rows).view(batch, n_kv, per_kv, head_dim),
         q_window.index_select(0, rows).view(batch, n_kv, per_kv, head_dim)],
        dim=2,
    )
    keys, values = _slot_block(slab.k, layer, group), _slot_block(slab.v, layer, group)
    both = q_both @ keys.transpose(-1, -2)  # [B, Hkv, 2 * per_kv, sinks + window]
    if sinks:
        scores = torch.where(slab.sink_columns, both[:, :, :per_kv], both[:, :, per_kv:])
    else:
        scores = both[:, :, per_kv:]
    q_own = q.index_select(0, rows).view(batch, n_kv, per_kv, head_dim)
    k_own, v_own = k.index_select(0, rows).unsqueeze(2), v.index_select(0, rows).unsqueeze(2)  # [B, Hkv, 1, D]
    own = q_own @ k_own.transpose(-1, -2)  # [B, Hkv, per_kv, 1]
    scores = torch.cat([scores, own], dim=-1).float() * (head_dim**-0.5) + group.mask[:, None, None, :]
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    attn = probs[..., :-1] @ values + probs[..., -1:] * v_own  # [B, Hkv, per_kv, D]
    out[rows] = attn.reshape(batch, n_heads, head_dim)


def _rows(x: torch.Tensor, group: AttnGroup) -> torch.Tensor:
    """Flat [N, H, D] -> per-group [B, T, H, D] (padding rows read the zero row appended at N)."""
    padded = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])
    return padded[group.tokens]


def _group_attention(out, q_cache, q_window, k_cache, k_window, v, slab: KVSlab, layer: int, group: AttnGroup):
    sinks = slab.geometry.sinks
    qc, qw = _rows(q_cache, group), _rows(q_window, group)  # [B, T, Hq, D]
    kc, kw, vc = _rows(k_cache, group), _rows(k_window, group), _rows(v, group)  # [B, T, Hkv, D]
    batch, steps, n_heads, head_dim = qc.shape
    n_kv = kc.shape[2]
    per_kv = n_heads // n_kv

    def heads_first(x):  # [B, T, Hq, D] -> [B, Hkv, per_kv * T, D]: GQA without repeating K/V
        return x.view(batch, steps, n_kv, per_kv, head_dim).permute(0, 2, 3, 1, 4).reshape(
            batch, n_kv, per_kv * steps, head_dim
        )

    if group.chunk_only:
        # Padding sits after each row's real tokens, so the causal mask alone keeps it out of real queries.
        attn = F.scaled_dot_product_attention(
            qw.transpose(1, 2), kw.transpose(1, 2), vc.transpose(1, 2), is_causal=True, enable_gqa=per_kv > 1
        )  # [B, Hq, T, D]
        attn = attn.transpose(1, 2)
        out[group.tokens[group.valid]] = attn[group.valid]
        return
    qc, qw = heads_first(qc), heads_first(qw)
    kc, kw, vc = kc.transpose(1, 2), kw.transpose(1, 2), vc.transpose(1, 2)  # [B, Hkv, T, D]
    if not slab.geometry.sinks:
        # One frame only (window, dense, recompute past its first chunk): the fused kernel with the mask,
        # so no [T x keys] score tensor is built per layer.
        used = group.ring_used  # a dense cache fills its ring in order: skip the entries never written
        ring_k = _slot_block(slab.k, layer, group)[:, :, :used]  # no sink entries without sinks
        ring_v = _slot_block(slab.v, layer, group)[:, :, :used]
        if group.attn_mask is None:  # [B, T, keys] -> [B, 1, per_kv * T, keys] in heads_first's query order
            window = slab.geometry.window
            mask = torch.cat([group.mask[..., steps : steps + used], group.mask[..., steps + window :]], dim=-1)
            group.attn_mask = mask[:, None].expand(batch, per_kv, steps, mask.shape[-1]).reshape(
                batch, 1, per_kv * steps, mask.shape[-1]
            )
        attn = F.scaled_dot_product_attention(
            qw, torch.cat([ring_k, kw], dim=2), torch.cat([ring_v, vc], dim=2), attn_mask=group.attn_mask,
            scale=head_dim**-0.5,
        )
        attn = attn.view(batch, n_kv, per_kv, steps, head_dim).permute(0, 3, 1, 2, 4).reshape(
            batch, steps, n_heads, head_dim
        )
        out[group.tokens[group.valid]] = attn[group.valid]
        return
    slab_k, slab_v = _slot_block(slab.k, layer, group), _slot_block(slab.v, layer, group)
    sink_k, ring_k = slab_k[:, :, :sinks], slab_k[:, :, sinks:]
    sink_v, ring_v = slab_v[:, :, :sinks], slab_v[:, :, sinks:]

    parts = []
    if sinks:
        parts += [qc @ sink_k.transpose(-1, -2), qc @ kc.transpose(-1, -2)]
    parts += [qw @ ring_k.transpose(-1, -2), qw @ kw.transpose(-1, -2)]
    scores = torch.cat(parts, dim=-1) * (head_dim**-0.5)
    width = scores.shape[-1]
    scores = scores.view(batch, n_kv, per_kv, steps, width)
    mask = group.mask if sinks else group.mask[..., sinks + steps :]
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(vc.dtype).view(batch, n_kv, per_kv * steps, width)

    window = ring_k.shape[2]
    if sinks:
        p_sink, p_chunk_c = probs[..., :sinks], probs[..., sinks : sinks + steps]
        rest = probs[..., sinks + steps :]
        attn = p_sink @ sink_v + (p_chunk_c + rest[..., window:]) @ vc + rest[..., :window] @ ring_v
    else:
        attn = probs[..., :window] @ ring_v + probs[..., window:] @ vc
    # [B, Hkv, per_kv * T, D] -> [B, T, Hq, D]
    attn = attn.view(batch, n_kv, per_kv, steps, head_dim).permute(0, 3, 1, 2, 4).reshape(
        batch, steps, n_heads, head_dim
    )
    out[group.tokens[group.valid]] = attn[group.valid]
