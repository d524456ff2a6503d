"""The KV slab: one preallocated tensor holding every session's sink-window cache.

Geometry per slot: `sinks` entries written once (the first tokens of the session) followed by a ring of
`window` entries that wraps; eviction overwrites the oldest ring entry and copies nothing.

Positions live inside the cache (StreamingLLM §3.2). Keys are stored rotated in one of two frames, so no
cached key is ever re-rotated per step:
- sink entries are rotated by their cache position (0..sinks-1, equal to their text position);
- ring entries are rotated by `text_position - base[slot]` (the "window frame"). Window tokens are
  contiguous in the text, so the distance between a query and a ring key in this frame is exactly their
  distance in cache positions. `base` moves forward (rotating the ring once, rarely) so frame positions
  stay small and exact.
A query is rotated twice: by its cache position (against sinks) and by its window-frame position
(against the ring). Attention therefore sees the cache positions [0..sinks-1, sinks..sinks+n-1] the
paper prescribes, whatever the text position is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sinkserve.engine.rope import apply_rope, rope_for_offsets, rotate_half_sign


@dataclass(frozen=True)
class SlabGeometry:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    sinks: int
    window: int
    slots: int

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.capacity * self.head_dim * element


class KVSlab:
    """Keys/values `[layers, slots, kv_heads, sinks + window, head_dim]` plus per-slot bookkeeping."""

    def __init__(self, geometry: SlabGeometry, dtype: torch.dtype, device: torch.device):
        self.geometry = geometry
        self.dtype, self.device = dtype, device
        shape = (geometry.n_layers, geometry.slots, geometry.n_kv_heads, geometry.capacity, geometry.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views, made once: the layers index them without a select per step.
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
        # Which entries of a slot are sinks (cache frame) rather than ring (window frame).
        self.sink_columns = torch.arange(geometry.capacity, device=device) < geometry.sinks
        slots, cap = geometry.slots, geometry.capacity
        # Tokens ever fed to the slot's session; the next token's text position.
        self.tokens_seen = torch.zeros(slots, dtype=torch.long, device=device)
        # Text position of each entry (-1: empty) and its token id (for export and repetition penalty).
        self.entry_position = torch.full((slots, cap), -1, dtype=torch.long, device=device)
        self.entry_token = torch.full((slots, cap), -1, dtype=torch.long, device=device)
        # Window-frame origin of the ring's rotation (see module doc).
        self.base = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self, slot: int) -> None:
        # Stale K/V need no clearing: entry_position = -1 masks them until overwritten.
        self.tokens_seen[slot] = 0
        self.base[slot] = 0
        self.entry_position[slot] = -1
        self.entry_token[slot] = -1

    def entries(self, slot: int) -> int:
        return int((self.entry_position[slot] >= 0).sum())

    def write_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Entry index for tokens at text `positions`: sinks first, then the ring."""
        s, w = self.geometry.sinks, self.geometry.window
        return torch.where(positions < s, positions, s + (positions - s).remainder(w))

    def ordered_tokens(self, slot: int) -> list[int]:
        """Token ids held by the slot, oldest first (sinks, then the ring from its oldest entry)."""
        positions = self.entry_position[slot]
        held = positions >= 0
        order = torch.argsort(positions[held])
        return self.entry_token[slot][held][order].tolist()

    def rebase(self, slots: torch.Tensor, new_base: torch.Tensor,
               inv_freq: torch.Tensor | list[torch.Tensor]) -> None:
        """Move the window frame of `slots` to `new_base`: rotate their ring keys by -(new_base - base).
        `inv_freq`: one for every layer, or a list with each layer's own (Gemma 3's local layers)."""
        s = self.geometry.sinks
        if isinstance(inv_freq, torch.Tensor) and not inv_freq.numel():  # no rotary (ALiBi): keys are stored
            self.base[slots] = new_base  # as they are, only the origin moves
            return
        per_layer = inv_freq if isinstance(inv_freq, list) else [inv_freq] * self.geometry.n_layers
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(self.geometry.n_layers):
            freq = per_layer[layer]
            if id(freq) not in tables:
                cos, sin = rope_for_offsets(freq, self.base[slots] - new_base, self.dtype)
                tables[id(freq)] = cos[:, None, None, :], rotate_half_sign(sin)[:, None, None, :]  # [slot, head, entry]
            ring = self.k[layer, slots, :, s:]
            self.k[layer, slots, :, s:] = apply_rope(ring, *tables[id(freq)])
        self.base[slots] = new_base

    # Parking: a slot's whole state as host tensors, and back (bit-exact).
    def export_slot(self, slot: int) -> dict[str, torch.Tensor]:
        return {
            "k": self.k[:, slot].to("cpu", copy=True),
            "v": self.v[:, slot].to("cpu", copy=True),
            "tokens_seen": self.tokens_seen[slot].cpu().clone(),
            "entry_position": self.entry_position[slot].cpu().clone(),
            "entry_token": self.entry_token[slot].cpu().clone(),
            "base": self.base[slot].cpu().clone(),
        }

    def import_slot(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        self.k[:, slot] = state["k"].to(self.device)
        self.v[:, slot] = state["v"].to(self.device)
        for name in ("tokens_seen", "entry_position", "entry_token", "base"):
            getattr(self, name)[slot] = state[name].to(self.device)
