"""The model runner: the KV slab, one batched forward per step, sampling. The seam a sharded runner implements.

The runner knows slots, ids and tensors, nothing of sessions or turns: the engine hands it the step's rows and
gets back logits or sampled token ids. Everything that touches KV memory goes through here (reset, export and
import of a slot, rebasing the window frame), so a runner whose slab is split over shards can do each on every
shard.
"""

from __future__ import annotations

import torch

from sinkserve.engine.kv_cache import KVSlab, SlabGeometry
from sinkserve.engine.sampling import sample
from sinkserve.engine.step_inputs import LocalLayers, RopeTables, RowInput, build_step_batch
from sinkserve.errors import ContextOverflow
from sinkserve.protocol import GenerationParams


class ModelRunner:
    def __init__(self, model: torch.nn.Module, geometry: SlabGeometry, policy: str, max_chunk: int):
        self.model = model
        self.args = model.args
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.geometry = geometry
        self.policy = policy
        self.slab = KVSlab(geometry, self.dtype, self.device)
        # Window-frame positions stay below rope.positions (see KVSlab.rebase).
        positions = geometry.sinks + 2 * geometry.window + max_chunk + 1
        self.rope = RopeTables.build(self.args, positions, self.dtype, self.device)
        # Sliding-window layers (Gemma 2/3): their own masks and, when their rotary base differs, tables.
        self.local = LocalLayers.build(self.args, positions, self.rope, self.dtype, self.device)
        self._rebase_freq = (self.rope.inv_freq if self.local is None
                             else self.local.inv_freq_per_layer(geometry.n_layers, self.rope.inv_freq))
        slots, device = geometry.slots, self.device
        # Per-slot sampling parameters, set when a turn starts (no per-step gathering from Python objects).
        self._temperature = torch.zeros(slots, device=device)
        self._top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self._top_p = torch.ones(slots, device=device)
        self._penalty = torch.ones(slots, device=device)
        self._seed = torch.zeros(slots, dtype=torch.long, device=device)
        self._counter = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def bytes_per_slot(self) -> int:
        return self.geometry.bytes_per_slot(self.dtype)

    # ---- KV memory
    def reset_slot(self, slot: int) -> None:
        self.slab.reset(slot)

    def export_slot(self, slot: int) -> dict[str, torch.Tensor]:
        return self.slab.export_slot(slot)

    def import_slot(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        self.slab.import_slot(slot, state)

    def state_nbytes(self, state: dict[str, torch.Tensor]) -> int:
        return sum(t.nbytes for t in state.values())

    def entries(self, slot: int) -> int:
        return self.slab.entries(slot)

    def scratch_slab(self, slots: int) -> KVSlab:
        """A slab of its own for scoring, so perplexity runs never take serving slots."""
        g = self.geometry
        return KVSlab(SlabGeometry(g.n_layers, g.n_kv_heads, g.head_dim, g.sinks, g.window, slots), self.dtype,
                      self.device)

    def close(self) -> None:
        """Release what the runner started (a sharded runner's other ranks); nothing for one process."""

    # ---- sampling settings
    def set_sampling(self, slot: int, params: GenerationParams, seed: int) -> None:
        self._temperature[slot] = params.temperature
        self._top_k[slot] = params.top_k
        self._top_p[slot] = params.top_p
        self._penalty[slot] = params.repetition_penalty
        self._seed[slot] = seed
        self._counter[slot] = 0

    # ---- the step
    @torch.inference_mode()
    def forward(self, rows: list[RowInput], slab: KVSlab | None = None) -> list[torch.Tensor | None]:
        """Runs every row's ids through the model in one forward; returns per row the logits it asked for."""
        slab = slab or self.slab
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        n_seen = slab.tokens_seen[slots]
        lengths = torch.tensor([len(r.ids) for r in rows], device=self.device)
        if self.policy == "dense":
            if bool((n_seen + lengths > slab.geometry.window).any()):
                raise ContextOverflow(f"dense cache holds {slab.geometry.window} tokens")
        else:
            self._maybe_rebase(slab, slots, n_seen, lengths)
        batch = build_step_batch(rows, slab, self.rope, n_seen, self.args.n_heads // self.args.n_kv_heads,
                                 self.local)
        logits = self.model(slab, batch)
        # Bookkeeping after the forward: entries now hold these tokens.
        slab.entry_position[batch.write_slot, batch.write_entry] = batch.position
        slab.entry_token[batch.write_slot, batch.write_entry] = batch.token_ids
        slab.tokens_seen.index_add_(0, batch.slots, batch.lengths)
        out: list[torch.Tensor | None] = []
        prev = 0
        for end in batch.logits_rows:
            out.append(logits[prev:end] if end > prev else None)
            prev = end
        return out

    @torch.inference_mode()
    def sample(self, slots: list[int], logits: torch.Tensor) -> list[int]:
        """One token per row of `logits` [B, vocab], with each slot's settings and its own noise counter."""
        index = torch.tensor(slots, device=self.device)
        need_seen = bool((self._penalty[index] != 1.0).any())
        tokens = sample(
            logits,
            self._temperature[index],
            self._top_k[index],
            self._top_p[index],
            self._penalty[index],
            self.slab.entry_token[index] if need_seen else None,
            self._seed[index],
            self._counter[index],
        )
        self._counter[index] += 1
        return tokens.tolist()

    def recompute_context(self, slot: int, new_ids: list[int]) -> list[int]:
        """Sliding window with re-computation: the slot is emptied and its sinks + window ids come back, with
        `new_ids`, to be re-encoded from scratch."""
        g = self.geometry
        held = self.slab.ordered_tokens(slot) + list(new_ids)
        if len(held) > g.capacity:
            held = held[: g.sinks] + held[len(held) - g.window :]
        self.reset_slot(slot)
        return held

    def _maybe_rebase(self, slab: KVSlab, slots: torch.Tensor, n_seen: torch.Tensor, lengths: torch.Tensor) -> None:
        last = n_seen + lengths - 1
        need = last - slab.base[slots] >= self.rope.positions
        if bool(need.any()):
            new_base = (n_seen[need] - slab.geometry.window).clamp(min=0)
            slab.rebase(slots[need], new_base, self._rebase_freq)
