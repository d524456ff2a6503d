"""Sink-window attention over the KV slab for one batched step.

A step's tokens are flattened to `[N, ...]` for the linear layers (no padding there). Attention runs per
group of sessions: a decode group (one query per session) and a prefill group (chunks padded to the
longest). Every query sees, in cache positions:
  - the slot's sink entries (keys in the cache frame),
  - the slot's ring entries still inside its window (keys in the window frame),
  - the earlier tokens of its own chunk (both frames computed; the mask picks the right one).
The chunk is written into the slab only after attention, so a chunk that wraps the ring never hides
entries from the earlier queries of the same chunk.

Decode rows (one query per session, the serving hot path) take a shorter path. A decode token's key is
written first: it takes the entry of the key leaving the window, so the query then attends to its whole slot,
itself included, in one product per layer: both rotations of the query against sinks + ring, the sink columns
read from the cache-frame rows and the ring columns from the window-frame rows. Only the entries written so
far are read, and the softmax scale is folded into the query's rotation tables. Reading the slot as one
contiguous block is what keeps the slab from being copied per layer.

ALiBi families (no rotary) store keys as they are, so both frames coincide and decode takes one product. The
step carries, per query and key column, the distance between their cache positions (step_inputs.py); each
layer adds -slope_h * distance to the scores, the slopes from `batch.alibi_slopes` (one per query head). The
sink-less fused-kernel shortcuts are skipped then (the bias is not a boolean mask).

Learned attention sinks (gpt-oss): `sink_logits` [Hq], one logit per query head that joins each softmax's
denominator and adds nothing to the output (probs = softmax over [scores, sink], sink column dropped). They are
not the StreamingLLM sink tokens (entries kept in the cache); a model may have both, or either. None (every
other family) leaves every path as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.rope import apply_rope
from sinkserve.engine.step_inputs import AttnGroup, DecodeRows, StepBatch


def sink_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slab: KVSlab, layer: int, batch: StepBatch,
    local: bool = False, softcap: float | None = None, sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] (not yet rotated) -> attention output [N, Hq, D]; writes k/v to the slab.
    `local`: a sliding-window layer (step_inputs.LocalLayers), which reads its own masks and rotary tables;
    `softcap`: Gemma 2's tanh capping of the scaled scores, before the mask; `sink_logits` [Hq]: learned
    per-head sink logits (see the module doc), None for none."""
    if local:
        batch = batch.local
    decode, slopes = batch.decode, batch.alibi_slopes
    if decode is not None and decode.rows is None:  # decode rows only: the serving hot path
        return _decode_attention(q, k, v, slab, layer, decode, slopes, softcap, sink_logits)
    out = q.new_empty(q.shape)
    if decode is not None:
        rows = decode.rows
        out[rows] = _decode_attention(q[rows], k[rows], v[rows], slab, layer, decode, slopes, softcap, sink_logits)
    tables = batch.chunk
    q_cache = apply_rope(q, tables.cos_cache, tables.sin_cache)
    q_window = apply_rope(q, tables.cos_window, tables.sin_window)
    # prefill chunks attend to their own keys in both frames
    chunk_keys = (apply_rope(k, tables.cos_cache, tables.sin_cache), apply_rope(k, tables.cos_window, tables.sin_window))
    for group in batch.groups:
        _group_attention(out, q_cache, q_window, *chunk_keys, v, slab, layer, group, slopes, softcap, sink_logits)
    # Written after attention, so a chunk that wraps the ring never hides entries from its own earlier queries.
    # Sink tokens are stored in the cache frame, window tokens in the window frame.
    rows = tables.rows
    k_chunk, v_chunk = (k, v) if rows is None else (k[rows], v[rows])
    slab.k_layers[layer][tables.write_slot, :, tables.write_entry] = apply_rope(k_chunk, tables.cos_store, tables.sin_store)
    slab.v_layers[layer][tables.write_slot, :, tables.write_entry] = v_chunk
    return out


def _slot_block(cache: torch.Tensor, slots: torch.Tensor, slot_range: tuple[int, int] | None,
                count: int | None = None) -> torch.Tensor:
    """One layer's slots, first `count` entries (all by default), [B, Hkv, count, D]: a view when the slots
    are contiguous, a gather of those entries only otherwise."""
    block = cache if count is None or count == cache.shape[2] else cache[:, :, :count]
    if slot_range is None:
        return block.index_select(0, slots)
    start, stop = slot_range
    return block if (start, stop) == (0, cache.shape[0]) else block[start:stop]


def _softmax_with_sink(scores: torch.Tensor, sink_logits: torch.Tensor) -> torch.Tensor:
    """float32 softmax over [scores, sink] without the sink column; scores [B, Hkv, per_kv, ..., keys] (query
    head h = kv * per_kv + j, as the heads-first layouts below order them), sink_logits [Hq]."""
    n_kv, per_kv = scores.shape[1], scores.shape[2]
    sink = sink_logits.to(scores.dtype).view(n_kv, per_kv, *([1] * (scores.dim() - 3)))
    combined = torch.cat([scores, sink.expand(scores.shape[:-1] + (1,))], dim=-1)
    return torch.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1]


def _with_sink_key(keys, values, allowed, sink_column):
    """The fused kernel has no sink term: one more key, all zeros (score 0), with a zero value and the sink
    logit as its mask bias, puts exp(sink) in the denominator and nothing in the output. keys/values
    [B, Hkv, S, D], allowed bool broadcasting to [B, H, L, S], sink_column [1, H, L, 1] -> keys, values, bias."""
    zero = keys.new_zeros(keys.shape[:2] + (1, keys.shape[-1]))
    bias = torch.zeros(allowed.shape, dtype=keys.dtype, device=keys.device).masked_fill(~allowed, float("-inf"))
    heads, queries = sink_column.shape[1], sink_column.shape[2]
    bias = bias.expand(bias.shape[0], heads, queries, bias.shape[-1])
    bias = torch.cat([bias, sink_column.to(keys.dtype).expand(bias.shape[0], -1, -1, -1)], dim=-1)
    return torch.cat([keys, zero], dim=2), torch.cat([values, zero], dim=2), bias


def _decode_attention(q, k, v, slab: KVSlab, layer: int, rows: DecodeRows, slopes=None,
                      softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """One query per slot -> [B, Hq, D]. The new key is written first: it takes the entry of the key that
    leaves the window (or the next free one), so the query attends to its slot's first key_count entries."""
    batch, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    per_kv = n_heads // n_kv
    slab.k_layers[layer][rows.write_slot, :, rows.write_entry] = apply_rope(k, rows.cos_k, rows.sin_k)
    slab.v_layers[layer][rows.write_slot, :, rows.write_entry] = v
    # [B, Hkv, frames * per_kv, D]: GQA without repeating K/V; with sinks, cache-frame rows then window-frame rows
    frames = rows.cos_q.shape[2]
    q_frames = apply_rope(q.view(batch, n_kv, 1, per_kv, head_dim), rows.cos_q, rows.sin_q, head_dim**-0.5)
    q_frames = q_frames.view(batch, n_kv, frames * per_kv, head_dim)
    count = rows.key_count
    keys = _slot_block(slab.k_layers[layer], rows.slots, rows.slot_range, count)
    values = _slot_block(slab.v_layers[layer], rows.slots, rows.slot_range, count)
    scores = q_frames @ keys.transpose(-1, -2)  # [B, Hkv, frames * per_kv, count]
    if frames == 2:
        scores = torch.where(rows.sink_columns, scores[:, :, :per_kv], scores[:, :, per_kv:])
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if rows.mask is not None:
        scores = scores + rows.mask[:, None, None, :]
    if rows.alibi_distance is not None:  # -slope_h * cache distance (float32, as the softmax)
        scores = torch.addcmul(scores.float(), slopes.view(1, n_kv, per_kv, 1), rows.alibi_distance, value=-1)
    if sink_logits is not None:
        probs = _softmax_with_sink(scores, sink_logits).to(values.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return (probs @ values).view(batch, n_heads, head_dim)


def _rows(x: torch.Tensor, group: AttnGroup) -> torch.Tensor:
    """Flat [N, H, D] -> per-group [B, T, H, D] (padding rows read the zero row appended at N)."""
    padded = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])
    return padded[group.tokens]


def _group_attention(out, q_cache, q_window, k_cache, k_window, v, slab: KVSlab, layer: int, group: AttnGroup,
                     slopes=None, softcap: float | None = None, sink_logits: torch.Tensor | None = None):
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

    if group.chunk_only and softcap is None:
        # Padding sits after each row's real tokens, so the causal mask alone keeps it out of real queries.
        q_heads, k_heads, v_heads = qw.transpose(1, 2), kw.transpose(1, 2), vc.transpose(1, 2)
        if sink_logits is None:
            attn = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, is_causal=True, enable_gqa=per_kv > 1)
        else:
            causal = torch.ones(steps, steps, dtype=torch.bool, device=qw.device).tril()[None, None]
            sink_column = sink_logits.view(1, n_heads, 1, 1).expand(1, n_heads, steps, 1)
            k_heads, v_heads, bias = _with_sink_key(k_heads, v_heads, causal, sink_column)
            attn = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, attn_mask=bias, enable_gqa=per_kv > 1)
        # attn: [B, Hq, T, D]
        attn = attn.transpose(1, 2)
        out[group.tokens[group.valid]] = attn[group.valid]
        return
    qc, qw = heads_first(qc), heads_first(qw)
    kc, kw, vc = kc.transpose(1, 2), kw.transpose(1, 2), vc.transpose(1, 2)  # [B, Hkv, T, D]
    if group.attn_mask is not None and softcap is None:  # set for sink-less groups (not for local layers)
        # One frame only (window, dense, recompute past its first chunk): the fused kernel with the mask,
        # so no [T x keys] score tensor is built per layer.
        used = group.ring_used  # a dense cache fills its ring in order: skip the entries never written
        ring_k = _slot_block(slab.k_layers[layer], group.slots, group.slot_range, used)  # no sink entries without sinks
        ring_v = _slot_block(slab.v_layers[layer], group.slots, group.slot_range, used)
        keys, values, mask = torch.cat([ring_k, kw], dim=2), torch.cat([ring_v, vc], dim=2), group.attn_mask
        if sink_logits is not None:  # queries are heads-first: [B, Hkv, per_kv * T]
            sink_column = sink_logits.view(n_kv, per_kv, 1).expand(n_kv, per_kv, steps).reshape(
                1, n_kv, per_kv * steps, 1)
            keys, values, mask = _with_sink_key(keys, values, mask, sink_column)
        attn = F.scaled_dot_product_attention(qw, keys, values, attn_mask=mask, scale=head_dim**-0.5)
        attn = attn.view(batch, n_kv, per_kv, steps, head_dim).permute(0, 3, 1, 2, 4).reshape(
            batch, steps, n_heads, head_dim
        )
        out[group.tokens[group.valid]] = attn[group.valid]
        return
    # the sink entries and the ring's entries written so far (the mask's columns): a fresh cache reads none
    slab_k = _slot_block(slab.k_layers[layer], group.slots, group.slot_range, sinks + group.ring_used)
    slab_v = _slot_block(slab.v_layers[layer], group.slots, group.slot_range, sinks + group.ring_used)
    sink_k, ring_k = slab_k[:, :, :sinks], slab_k[:, :, sinks:]
    sink_v, ring_v = slab_v[:, :, :sinks], slab_v[:, :, sinks:]

    parts = []
    if sinks:
        parts += [qc @ sink_k.transpose(-1, -2), qc @ kc.transpose(-1, -2)]
    parts += [qw @ ring_k.transpose(-1, -2), qw @ kw.transpose(-1, -2)]
    scores = torch.cat(parts, dim=-1) * (head_dim**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    width = scores.shape[-1]
    scores = scores.view(batch, n_kv, per_kv, steps, width)
    mask = group.mask if sinks else group.mask[..., sinks + steps :]
    if group.alibi_distance is not None:  # -slope_h * cache distance, per column of the mask
        distance = group.alibi_distance if sinks else group.alibi_distance[..., steps:]
        scores = torch.addcmul(scores.float(), slopes.view(1, n_kv, per_kv, 1, 1), distance, value=-1)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    if sink_logits is not None:
        probs = _softmax_with_sink(scores, sink_logits)
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    probs = probs.to(vc.dtype).reshape(batch, n_kv, per_kv * steps, width)  # the sink slice is a strided view

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
