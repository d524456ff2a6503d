"""A step's rows -> the immutable tensors every layer reads (`StepBatch`).

Built once per step, before the forward, from the rows and the slab's bookkeeping; nothing fills or rewrites it
during the forward. A step's tokens are flattened to `[N, ...]` for the linear layers (no padding there).
Attention reads them per group of sessions: decode rows (one query per session) and a prefill group (chunks
padded to the longest).

Positions live inside the cache (StreamingLLM §3.2): every token gets its text position, its cache position
(against the sinks) and its window-frame position (against the ring); see kv_cache.py for the two frames.
ALiBi families (no rotation: rot_dim 0, both frames equal) get, per query and key column, the distance between
their cache positions instead; attention adds -slope_h * distance to the scores (`alibi_distance` below).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.rope import inv_frequencies, rope_table, rotate_half_sign

LogitsMode = Literal["none", "last", "all"]


@dataclass(frozen=True)
class RowInput:
    """One session's slice of a step: its slot, the ids it feeds, which logits it wants back."""

    slot: int
    ids: list[int]
    logits: LogitsMode


@dataclass(frozen=True)
class RopeTables:
    """cos/sin by position, made once per engine. sin tables carry rotate-half's sign (rope.apply_rope); the
    query tables also carry the softmax scale, so decode queries are scaled by their rotation. A family without
    rotary (rot_dim 0) has empty tables; with ALiBi (`args.alibi_slopes`) its per-head slopes ride here."""

    inv_freq: torch.Tensor
    positions: int  # window-frame positions stay below this (KVSlab.rebase keeps them there)
    cos: torch.Tensor
    sin: torch.Tensor
    cos_query: torch.Tensor
    sin_query: torch.Tensor
    alibi_slopes: torch.Tensor | None = None  # [n_heads] float32: the step carries ALiBi distances when set

    @property
    def rotary(self) -> bool:
        return self.inv_freq.numel() > 0

    @classmethod
    def build(cls, args, positions: int, dtype: torch.dtype, device: torch.device) -> "RopeTables":
        inv_freq = inv_frequencies(args.rot_dim, args.rope_theta, args.rope_scaling)
        cos, sin = rope_table(inv_freq, positions, dtype, device)
        sin = rotate_half_sign(sin)
        scale = args.head_dim**-0.5
        slopes = getattr(args, "alibi_slopes", None)
        slopes = None if slopes is None else slopes.to(device=device, dtype=torch.float32)
        return cls(inv_freq, positions, cos, sin, cos * scale, sin * scale, slopes)


@dataclass(frozen=True)
class LocalLayers:
    """Local (sliding-window) layers, as in Gemma 2/3: each query sees only the keys less than `window` text
    positions before it (itself included), HF's sliding-window rule, intersected with what the cache holds.
    Sink entries get no exception: a local layer sees them only while they are that close, as HF's sliding
    layers, which have no sinks. Global layers keep the sinks + rolling window. `rope` holds the local layers'
    own rotary tables (Gemma 3 rotates them with another base); `layers` says which layers are local."""

    window: int
    layers: tuple[int, ...]
    rope: RopeTables

    @classmethod
    def build(cls, args, positions: int, global_rope: RopeTables, dtype: torch.dtype,
              device: torch.device) -> "LocalLayers | None":
        window = getattr(args, "local_window", None)
        if not window:
            return None
        theta, scaling = args.local_rope_theta, args.local_rope_scaling
        same = (theta, scaling) == (args.rope_theta, args.rope_scaling)
        rope = global_rope if same else RopeTables.build(
            replace(args, rope_theta=theta, rope_scaling=scaling), positions, dtype, device)
        return cls(window, tuple(args.local_layers), rope)

    def inv_freq_per_layer(self, n_layers: int, global_inv_freq: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's rotary frequencies, for KVSlab.rebase."""
        return [self.rope.inv_freq if i in self.layers else global_inv_freq for i in range(n_layers)]


@dataclass(frozen=True)
class AttnGroup:
    """Sessions ingesting a chunk of more than one token this step (padded to the longest chunk)."""

    slots: torch.Tensor  # [B] slot index per row
    slot_range: tuple[int, int] | None  # (start, stop) when slots are contiguous: slab slices, no copy
    tokens: torch.Tensor  # [B, T] flat token index per (row, query); padding points at row N (zeros)
    valid: torch.Tensor  # [B, T] bool: real query
    # bool [B, T, sinks + T + ring_used + T]: which key each query sees (the ring's never-written entries are
    # left out, so a chunk into a fresh cache costs its own length, not the window's)
    mask: torch.Tensor
    # No sinks and nothing in any row's ring (recompute re-encodes, a window session's first chunk): the chunk
    # attends causally to itself only, and the fused attention kernel does it without a [T x T] score tensor.
    chunk_only: bool = False
    # Sink-less chunks over a ring: `mask` laid out for the fused kernel, [B, 1, per_kv * T, ring_used + T].
    attn_mask: torch.Tensor | None = None
    ring_used: int = 0  # ring entries [0, ring_used) can hold keys for some row (the rest were never written)
    # ALiBi: float32 [B, 1, 1, T, sinks + T + ring_used + T], query cache position minus key cache position per
    # column of `mask` (masked columns hold anything)
    alibi_distance: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeRows:
    """Sessions feeding one token each this step (decoding, or a one-token chunk)."""

    rows: torch.Tensor | None  # [B] flat token index of each; None when the step holds decode rows only
    slots: torch.Tensor  # [B]
    slot_range: tuple[int, int] | None  # (start, stop) when slots are contiguous: slab slices, no copy
    key_count: int  # entries [0, key_count) of the slots hold a key for some row, the new ones included
    mask: torch.Tensor | None  # [B, key_count] additive 0 / -inf (model dtype); None when every row fills them
    sink_columns: torch.Tensor | None  # bool [key_count]: sink entries (cache frame); None without sinks
    # [B, 1, frames, 1, rot_dim]: frames = (cache, window) with sinks, (window,) without; the softmax scale
    # is folded in, and sin carries rotate-half's sign (apply_rope)
    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor  # [B, 1, rot_dim] the frame each key is stored in: cache for sinks, window otherwise
    sin_k: torch.Tensor
    write_slot: torch.Tensor  # [B]
    write_entry: torch.Tensor  # [B]
    alibi_distance: torch.Tensor | None = None  # ALiBi: float32 [B, 1, 1, key_count] query minus key cache position


@dataclass(frozen=True)
class ChunkTables:
    """Rotations and write targets of the prefill tokens (over all N tokens unless said)."""

    cos_cache: torch.Tensor  # [N, 1, rot_dim] rotation by cache position (against sinks)
    sin_cache: torch.Tensor
    cos_window: torch.Tensor  # [N, 1, rot_dim] rotation by window-frame position (against the ring)
    sin_window: torch.Tensor
    rows: torch.Tensor | None  # flat indices of the chunk tokens, written after attention; None = all N
    cos_store: torch.Tensor  # [chunk tokens, 1, rot_dim] the frame each chunk key is stored in
    sin_store: torch.Tensor
    write_slot: torch.Tensor  # [chunk tokens]
    write_entry: torch.Tensor  # [chunk tokens] entry index inside the slot


@dataclass(frozen=True)
class StepBatch:
    """Everything the layers need for one step; built once, shared by every layer, never written to."""

    token_ids: torch.Tensor  # [N]
    decode: DecodeRows | None
    groups: tuple[AttnGroup, ...]  # chunked prefill
    chunk: ChunkTables | None  # set when groups are
    logits_index: torch.Tensor  # [M] flat indices whose logits the forward returns (at least one)
    logits_rows: tuple[int, ...]  # per row: the end of its logits in logits_index (0 rows = none asked)
    # Bookkeeping written to the slab after the forward.
    slots: torch.Tensor  # [rows]
    lengths: torch.Tensor  # [rows]
    position: torch.Tensor  # [N] text position of every token
    write_slot: torch.Tensor  # [N]
    write_entry: torch.Tensor  # [N]
    alibi_slopes: torch.Tensor | None = None  # [n_heads] float32 (RopeTables.alibi_slopes)
    # What local (sliding-window) layers read instead: their masks and rotary tables (LocalLayers); None
    # for models without local layers.
    local: "StepBatch | None" = None


def build_step_batch(
    rows: list[RowInput], slab: KVSlab, rope: RopeTables, n_seen: torch.Tensor, per_kv_heads: int,
    local: LocalLayers | None = None,
) -> StepBatch:
    """The step's inputs. `n_seen` [rows]: tokens each row's slot has seen before this step; `per_kv_heads`:
    query heads per KV head; `local`: the model's local layers, if it has any."""
    device = slab.device
    geometry = slab.geometry
    sinks, window = geometry.sinks, geometry.window
    lengths = [len(r.ids) for r in rows]
    slots = torch.tensor([r.slot for r in rows], device=device)
    base = slab.base[slots]

    lengths_t = torch.tensor(lengths, device=device)
    row_of_token = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths_t)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    offset = torch.arange(int(lengths_t.sum()), device=device) - starts[row_of_token]
    position = n_seen[row_of_token] + offset  # text position of every token
    is_sink = position < sinks
    cache_position = torch.where(is_sink, position, sinks + (position - sinks).clamp(max=window - 1))
    window_position = position - base[row_of_token]
    store_position = torch.where(is_sink, cache_position, window_position)
    token_ids = torch.tensor([t for r in rows for t in r.ids], device=device)
    write_slot, write_entry = slots[row_of_token], slab.write_index(position)

    logits_index, logits_rows = [], []
    cursor = 0
    for i, r in enumerate(rows):
        if r.logits == "all":
            logits_index.extend(range(cursor, cursor + lengths[i]))
        elif r.logits == "last":
            logits_index.append(cursor + lengths[i] - 1)
        logits_rows.append(len(logits_index))
        cursor += lengths[i]
    if not logits_index:  # a step that only ingests still runs every layer: one row of logits, dropped
        logits_index = [0]

    single = [i for i, n in enumerate(lengths) if n == 1]
    multi = [i for i, n in enumerate(lengths) if n > 1]
    decode = None
    if single:
        decode = _decode_rows(single, starts, n_seen, cache_position, window_position, store_position,
                              write_slot, write_entry, slab, rope, decode_only=not multi)
    groups, chunk, chunk_rows = (), None, None
    if multi:
        chunk_rows = None if not single else torch.nonzero(lengths_t[row_of_token] > 1).squeeze(1)
        chunk = _chunk_tables(rope, cache_position, window_position, store_position, chunk_rows, write_slot,
                              write_entry)
        groups = (_group(multi, lengths, starts, slots, n_seen, slab, per_kv_heads,
                         alibi=rope.alibi_slopes is not None),)
    local_batch = None
    if local is not None:
        local_decode = local_chunk = None
        if single:
            local_decode = _decode_rows(single, starts, n_seen, cache_position, window_position, store_position,
                                        write_slot, write_entry, slab, local.rope, decode_only=not multi)
            local_decode = replace(local_decode, mask=_local_decode_mask(local_decode, position, slab, local.window))
        if multi:
            local_chunk = _chunk_tables(local.rope, cache_position, window_position, store_position, chunk_rows,
                                        write_slot, write_entry)
        local_batch = dict(decode=local_decode, chunk=local_chunk,
                           groups=tuple(_local_group(g, slab, local.window) for g in groups))
    batch = StepBatch(
        token_ids=token_ids,
        decode=decode,
        groups=groups,
        chunk=chunk,
        logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        logits_rows=tuple(logits_rows),
        slots=slots,
        lengths=lengths_t,
        position=position,
        write_slot=write_slot,
        write_entry=write_entry,
        alibi_slopes=rope.alibi_slopes,
    )
    return batch if local_batch is None else replace(batch, local=replace(batch, **local_batch))


def _chunk_tables(rope: RopeTables, cache_position, window_position, store_position, chunk_rows, write_slot,
                  write_entry) -> ChunkTables:
    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if chunk_rows is None else x[chunk_rows]

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [n, 1, rot]: over heads
        return rope.cos[positions][:, None], rope.sin[positions][:, None]

    cos_cache, sin_cache = tables(cache_position)
    cos_window, sin_window = tables(window_position)
    cos_store, sin_store = tables(pick(store_position))
    return ChunkTables(cos_cache, sin_cache, cos_window, sin_window, chunk_rows, cos_store, sin_store,
                       pick(write_slot), pick(write_entry))


def _local_decode_mask(rows: DecodeRows, position: torch.Tensor, slab: KVSlab, window: int) -> torch.Tensor:
    """[B, key_count] additive mask of a local layer's decode rows: an entry counts when it holds a key less
    than `window` text positions back. The entry this step writes still shows its old position in the
    bookkeeping (updated after the forward): it holds the row's own token."""
    count = rows.key_count
    held = slab.entry_position[rows.slots, :count].clone()
    own = position[rows.rows] if rows.rows is not None else position
    held[torch.arange(len(own), device=held.device), rows.write_entry] = own
    near = (held >= 0) & (own[:, None] - held < window)
    return torch.zeros(near.shape, dtype=slab.dtype, device=slab.device).masked_fill_(~near, float("-inf"))


def _local_group(group: AttnGroup, slab: KVSlab, window: int) -> AttnGroup:
    """The prefill group as a local layer sees it: the global mask, less the keys `window` or more text
    positions back. Always the explicit-score path (no fused-kernel shortcut, whose masks are global)."""
    sinks = slab.geometry.sinks
    batch, steps = group.valid.shape
    device = group.valid.device
    t_q = slab.tokens_seen[group.slots][:, None] + torch.arange(steps, device=device)[None, :]  # [B, T]
    key_position = torch.cat([
        torch.arange(sinks, device=device)[None, :].expand(batch, -1),  # sink entries hold positions 0..sinks-1
        t_q,  # the chunk, cache frame
        slab.entry_position[group.slots, sinks : sinks + group.ring_used],  # the ring's used entries
        t_q,  # the chunk, window frame
    ], dim=-1)
    mask = group.mask & (t_q[:, :, None] - key_position[:, None, :] < window)
    mask[..., -1] |= ~mask.any(-1)  # padding queries: any key, result discarded (avoids NaN)
    return replace(group, mask=mask, chunk_only=False, attn_mask=None)


def _group(members, lengths, starts, slots, n_seen, slab: KVSlab, per_kv: int, alibi: bool = False) -> AttnGroup:
    device = slab.device
    sinks, window = slab.geometry.sinks, slab.geometry.window
    idx = torch.tensor(members, device=device)
    group_slots = slots[idx]
    steps = max(lengths[i] for i in members)
    group_len = torch.tensor([lengths[i] for i in members], device=device)
    arange_t = torch.arange(steps, device=device)
    valid = arange_t[None, :] < group_len[:, None]  # [B, T]
    n_tokens = int(sum(lengths))
    tokens = torch.where(valid, starts[idx][:, None] + arange_t[None, :], n_tokens)
    t_q = n_seen[idx][:, None] + arange_t[None, :]  # [B, T]
    seen = n_seen[idx]

    sink_mask = (torch.arange(sinks, device=device)[None, :] < seen[:, None])[:, None, :].expand(-1, steps, -1)
    ring_used = min(window, max(0, int(seen.max()) - sinks))  # entries are written in order until the ring wraps
    ring_position = slab.entry_position[group_slots, sinks : sinks + ring_used]  # [B, ring_used]
    ring = (ring_position >= 0)[:, None, :] & (t_q[:, :, None] - ring_position[:, None, :] <= window - 1)
    causal = arange_t[None, :, None] >= arange_t[None, None, :]  # [1, T(q), T(k)]
    key_valid = valid[:, None, :]
    chunk_sink = key_valid & causal & (t_q < sinks)[:, None, :]
    distance = t_q[:, :, None] - t_q[:, None, :]
    chunk_window = key_valid & causal & (t_q >= sinks)[:, None, :] & (distance <= window - 1)
    mask = torch.cat([sink_mask, chunk_sink, ring, chunk_window], dim=-1) & valid[:, :, None]
    mask[..., -1] |= ~mask.any(-1)  # padding queries: any key, result discarded (avoids NaN)
    # Within one chunk every distance is below the window, so with no sinks and an empty ring the mask
    # is plain causal.
    chunk_only = sinks == 0 and ring_used == 0 and steps <= window and not alibi
    attn_mask, distance = None, None
    if alibi:
        # Cache positions (§3.2): a sink (or a chunk key that is one) sits at its text position, the query at its
        # cache position; ring and chunk keys are contiguous with the query, so their distance is the text one.
        cache_q = torch.where(t_q < sinks, t_q, sinks + (t_q - sinks).clamp(max=window - 1))[:, :, None]
        distance = torch.cat([
            cache_q - torch.arange(sinks, device=device), cache_q - t_q[:, None, :],
            t_q[:, :, None] - ring_position[:, None, :], t_q[:, :, None] - t_q[:, None, :],
        ], dim=-1).float()[:, None, None]
    elif sinks == 0 and not chunk_only:
        # One frame only (window, dense, recompute past its first chunk): [B, T, ring_used + T] in the query
        # order of attention's heads-first layout, [B, 1, per_kv * T, keys].
        keys = mask[..., steps:]  # the ring's used entries, then the chunk
        attn_mask = keys[:, None].expand(len(members), per_kv, steps, keys.shape[-1]).reshape(
            len(members), 1, per_kv * steps, keys.shape[-1]
        )
    return AttnGroup(group_slots, slot_range(group_slots), tokens, valid, mask, chunk_only=chunk_only,
                     attn_mask=attn_mask, ring_used=ring_used, alibi_distance=distance)


def _decode_rows(members, starts, n_seen, cache_position, window_position, store_position,
                 write_slot, write_entry, slab: KVSlab, rope: RopeTables, decode_only: bool) -> DecodeRows:
    device, sinks = slab.device, slab.geometry.sinks
    idx = torch.tensor(members, device=device)
    rows = starts[idx]  # one token per member: its flat index
    group_slots, seen = write_slot[rows], n_seen[idx]
    # Entries are written in order (sinks, then the ring until it wraps), so once this token is written a
    # slot holds exactly its first `filled` entries.
    filled = (seen + 1).clamp(max=slab.geometry.capacity)
    key_count, fewest = int(filled.max()), int(filled.min())
    mask = None
    if fewest < key_count:
        empty = torch.arange(key_count, device=device)[None, :] >= filled[:, None]
        mask = torch.zeros(empty.shape, dtype=slab.dtype, device=device).masked_fill_(empty, float("-inf"))
    cache_pos, window_pos, store_pos = cache_position[rows], window_position[rows], store_position[rows]
    distance = None
    if rope.alibi_slopes is not None:
        # Sink entry e sits at cache position e; ring entries were written in order, so the one `back` entries
        # behind this token's (mod window) is `back` tokens older: its cache distance too. Empty entries are masked.
        entry = torch.arange(key_count, device=device)
        back = (write_entry[rows][:, None] - entry).remainder(slab.geometry.window)
        distance = torch.where(entry < sinks, cache_pos[:, None] - entry, back).float()[:, None, None]
    if sinks and rope.rotary:  # without rotary both frames are the same: one product
        cos_q = torch.stack([rope.cos_query[cache_pos], rope.cos_query[window_pos]], dim=1)
        sin_q = torch.stack([rope.sin_query[cache_pos], rope.sin_query[window_pos]], dim=1)
    else:
        cos_q, sin_q = rope.cos_query[window_pos][:, None], rope.sin_query[window_pos][:, None]
    return DecodeRows(
        rows=None if decode_only else rows,
        slots=group_slots,
        slot_range=slot_range(group_slots),
        key_count=key_count,
        mask=mask,
        sink_columns=slab.sink_columns[:key_count] if sinks else None,
        cos_q=cos_q[:, None, :, None],
        sin_q=sin_q[:, None, :, None],
        cos_k=rope.cos[store_pos][:, None],
        sin_k=rope.sin[store_pos][:, None],
        write_slot=group_slots,
        write_entry=write_entry[rows],
        alibi_distance=distance,
    )


def slot_range(slots: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when `slots` are consecutive (the slab is then sliced, not gathered), else None."""
    slot_list = slots.tolist()
    contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
    return (slot_list[0], slot_list[-1] + 1) if contiguous else None
