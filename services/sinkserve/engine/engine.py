"""The engine: many chat sessions, one KV slab, one batched forward per step.

Pure torch: no Ray, no Redis. Not thread-safe; drive it from one thread.
"""

from __future__ import annotations

import heapq
import json
import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.attention import AttnGroup, DecodeRows, StepBatch
from sinkserve.engine.chat import ChatFormat, Detokenizer
from sinkserve.engine.kv_cache import KVSlab, SlabGeometry
from sinkserve.engine.models import load_model
from sinkserve.engine.rope import inv_frequencies, rope_table, rotate_half_sign
from sinkserve.engine.sampling import sample
from sinkserve.engine.types import (
    ContextOverflow,
    InvalidRequest,
    NoFreeSlot,
    SamplingParams,
    SessionBusy,
    SessionInfo,
    SessionNotFound,
    TokenOutput,
)
from sinkserve.engine.weights import resolve_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LogitsMode = Literal["none", "last", "all"]


@dataclass
class _Session:
    id: str
    slot: int | None  # None while parked
    state: Literal["idle", "prefill", "decode"] = "idle"
    feed: list[int] = field(default_factory=list)  # ids still to ingest (in order)
    unlogged: list[int] = field(default_factory=list)  # fed or queued, not yet reported in turn_tokens
    fed: int = 0  # tokens fed into the current slot contents
    seen_offset: int = 0  # tokens of the transcript that a rebuild skipped
    turns: int = 0
    params: SamplingParams | None = None
    seed: int = 0
    samples: int = 0  # noise counter
    next_input: int | None = None  # sampled, streamed, not yet fed
    turn_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detok: Detokenizer | None = None
    parked_state: dict | None = None


@dataclass
class _Row:
    """One session's slice of a step: which slot, which ids, which logits to return."""

    slot: int
    ids: list[int]
    logits: LogitsMode


class Engine:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, hf_config: dict, tokenizer, model_name: str):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        args = model.args
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_context = args.max_context
        self.policy = config.policy
        sinks = 0 if config.policy in ("window", "dense") else config.sinks
        window = config.window
        if config.policy == "dense":
            window = config.max_context or args.max_context
        if sinks < 0 or window < 1:
            raise InvalidRequest("sinks must be >= 0 and window >= 1")
        if config.policy != "dense" and sinks + window > args.max_context:
            # Cache positions past the trained context would be out of distribution for the model.
            raise InvalidRequest(
                f"sinks + window = {sinks + window} exceeds the model's context length {args.max_context}"
            )
        self.sinks, self.window = sinks, window
        self.geometry = SlabGeometry(args.n_layers, args.n_kv_heads, args.head_dim, sinks, window, config.max_sessions)
        self.slab = KVSlab(self.geometry, self.dtype, self.device)
        self.bytes_per_session = self.geometry.bytes_per_slot(self.dtype)

        # Window-frame positions stay below rope_positions (see KVSlab.rebase).
        self.max_chunk = sinks + window if config.policy == "recompute" else min(config.prefill_chunk, window)
        self.rope_positions = sinks + 2 * window + self.max_chunk + 1
        self.inv_freq = inv_frequencies(args.rot_dim, args.rope_theta, args.rope_scaling)
        self.cos, self.sin = rope_table(self.inv_freq, self.rope_positions, self.dtype, self.device)
        # Decode queries: the softmax scale folded into their rotation; rotate-half's sign folded into sin.
        scale = args.head_dim**-0.5
        self.sin_signed = rotate_half_sign(self.sin)
        self.cos_query, self.sin_query = self.cos * scale, self.sin_signed * scale

        self.chat_format = ChatFormat(tokenizer)
        self.eos_ids = _eos_ids(hf_config, tokenizer)

        slots = config.max_sessions
        self._free_slots = list(range(slots))
        heapq.heapify(self._free_slots)
        self._sessions: dict[str, _Session] = {}
        self._slot_owner: list[str | None] = [None] * slots
        # Per-slot sampling parameters, set when a turn starts (no per-step gathering from Python objects).
        self._temperature = torch.zeros(slots, device=self.device)
        self._top_k = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._top_p = torch.ones(slots, device=self.device)
        self._penalty = torch.ones(slots, device=self.device)
        self._seed = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._counter = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.steps_run = 0

    # ------------------------------------------------------------------ sessions

    @property
    def max_sessions(self) -> int:
        return self.geometry.slots

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def capacity(self) -> int:
        return self.geometry.capacity

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"session {session_id!r} does not exist") from None

    def _take_slot(self, session_id: str) -> int:
        if not self._free_slots:
            raise NoFreeSlot(f"all {self.max_sessions} KV slots are in use")
        slot = heapq.heappop(self._free_slots)
        self.slab.reset(slot)
        self._slot_owner[slot] = session_id
        return slot

    def _release_slot(self, slot: int) -> None:
        self._slot_owner[slot] = None
        heapq.heappush(self._free_slots, slot)

    def _new_session(self, session_id: str | None) -> _Session:
        session_id = session_id or uuid.uuid4().hex
        if not isinstance(session_id, str) or not session_id:
            raise InvalidRequest("session_id must be a non-empty string")
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id!r} already exists")
        session = _Session(id=session_id, slot=self._take_slot(session_id))
        self._sessions[session_id] = session
        return session

    def open_session(self, session_id: str | None = None, system_prompt: str | None = None) -> str:
        """Take a slot for a new session; the system prompt is ingested with the first message."""
        session = self._new_session(session_id)
        session.feed = self.chat_format.system_ids(system_prompt)
        session.unlogged = list(session.feed)
        return session.id

    def import_session(self, session_id: str, transcript: list[int], total_tokens: int | None = None) -> str:
        """Rebuild a session from its transcript: the first `sinks` ids and the last `window` ids are
        re-ingested (lazily, with the next message), which is what its cache held.

        With `total_tokens` (the transcript's full length) `transcript` may be just its two ends, concatenated:
        at least the first `sinks` and the last `window` ids, so a long log need not be read whole."""
        if any((not isinstance(t, int)) or t < 0 or t >= self.model.args.vocab_size for t in transcript):
            raise InvalidRequest("transcript holds ids outside the vocabulary")
        total = len(transcript) if total_tokens is None else total_tokens
        if total < len(transcript):
            raise InvalidRequest(f"total_tokens {total} is shorter than the {len(transcript)} ids given")
        if total > len(transcript) and len(transcript) < self.capacity:
            raise InvalidRequest(
                f"a partial transcript needs its first {self.sinks} and last {self.window} ids "
                f"({self.capacity} at least), got {len(transcript)}"
            )
        if self.policy == "dense" and total > self.capacity:
            raise ContextOverflow(f"transcript of {total} tokens exceeds dense capacity {self.capacity}")
        session = self._new_session(session_id)
        keep = list(transcript)
        if len(keep) > self.capacity or total > len(keep):
            keep = keep[: self.sinks] + keep[len(keep) - self.window :]
        session.feed = keep
        session.seen_offset = total - len(keep)
        return session.id

    def close_session(self, session_id: str) -> None:
        session = self._session(session_id)
        del self._sessions[session_id]
        if session.slot is not None:
            self._release_slot(session.slot)

    def session_info(self, session_id: str) -> SessionInfo:
        s = self._session(session_id)
        return SessionInfo(
            session_id=s.id,
            tokens_seen=s.seen_offset + s.fed,
            cache_entries=self._entries(s.fed),
            cache_capacity=self.capacity,
            turns=s.turns,
            busy=s.state != "idle",
            parked=s.slot is None,
        )

    def _entries(self, fed: int) -> int:
        return min(fed, self.sinks) + min(max(0, fed - self.sinks), self.window)

    # Parking: an idle session gives its slot back; its cache waits in host memory, bit-exact.
    def park(self, session_id: str) -> dict:
        s = self._session(session_id)
        if s.state != "idle":
            raise SessionBusy(f"session {session_id!r} is busy")
        if s.slot is None:
            return s.parked_state
        s.parked_state = self.slab.export_slot(s.slot)
        self._release_slot(s.slot)
        s.slot = None
        return s.parked_state

    def unpark(self, session_id: str) -> None:
        s = self._session(session_id)
        if s.slot is not None:
            return
        slot = self._take_slot(session_id)
        self.slab.import_slot(slot, s.parked_state)
        s.slot, s.parked_state = slot, None

    def parked_bytes(self, session_id: str) -> int:
        state = self._session(session_id).parked_state or {}
        return sum(t.nbytes for t in state.values())

    # ------------------------------------------------------------------ turns

    def add_message(self, session_id: str, text: str, params: SamplingParams | None = None) -> None:
        """Start a turn: queue the user message (and the assistant header) and reply to it."""
        s = self._session(session_id)
        if s.state != "idle":
            raise SessionBusy(f"session {session_id!r} is still replying")
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("message is empty")
        params = params or SamplingParams()
        params.validate()
        ids = self.chat_format.user_ids(text)
        if self.policy == "dense" and s.fed + len(s.feed) + len(ids) + params.max_tokens > self.capacity:
            raise ContextOverflow(
                f"dense cache holds {self.capacity} tokens; this turn would need "
                f"{s.fed + len(s.feed) + len(ids) + params.max_tokens}"
            )
        if s.slot is None:
            self.unpark(session_id)
        s.feed.extend(ids)
        s.turn_tokens = s.unlogged + ids
        s.unlogged = []
        s.prompt_tokens = len(s.feed)
        s.completion_tokens = 0
        s.params = params
        s.next_input = None
        s.detok = Detokenizer(self.tokenizer, params.stop)
        seed = params.seed if params.seed is not None else self.config.seed
        s.seed = seed if seed is not None else secrets.randbits(31)
        s.samples = 0
        slot = s.slot
        self._temperature[slot] = params.temperature
        self._top_k[slot] = params.top_k
        self._top_p[slot] = params.top_p
        self._penalty[slot] = params.repetition_penalty
        self._seed[slot] = s.seed
        self._counter[slot] = 0
        s.state = "prefill"

    def has_work(self) -> bool:
        return any(s.state != "idle" for s in self._sessions.values())

    def abort_turn(self, session_id: str) -> TokenOutput | None:
        """Stop the session's reply now. The cache and the returned turn_tokens stay consistent: a message
        not fully ingested yet is still ingested with the next one (it is in the transcript)."""
        s = self._session(session_id)
        if s.state == "idle":
            return None
        return self._finish(s, "aborted", token_id=None, text=s.detok.flush() if s.detok else "")

    def chat(self, session_id: str, text: str, params: SamplingParams | None = None) -> Iterator[TokenOutput]:
        """add_message + step() until the reply ends; yields this session's events. For single-driver use:
        events of other sessions stepped meanwhile are not delivered anywhere."""
        self.add_message(session_id, text, params)
        while True:
            for out in self.step():
                if out.session_id == session_id:
                    yield out
                    if out.finished:
                        return

    def _finish(self, s: _Session, reason: str, token_id: int | None, text: str) -> TokenOutput:
        close = list(self.chat_format.close_ids)
        unfed = []
        if s.next_input is not None:  # sampled and logged, not fed yet
            unfed.append(s.next_input)
            if close and close[0] == s.next_input:  # the reply ended with the template's own end token
                close = close[1:]
        s.feed.extend(unfed + close)  # ingested with the next message
        s.turn_tokens.extend(close)
        s.turns += 1
        s.state, s.next_input, s.params = "idle", None, None
        turn_tokens, s.turn_tokens = s.turn_tokens, []
        return TokenOutput(
            session_id=s.id,
            token_id=token_id,
            text=text,
            finished=True,
            finish_reason=reason,
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            turn_tokens=turn_tokens,
        )

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """One batched forward over every session that is ingesting or generating."""
        decode, prefill = [], []
        budget = self.config.max_step_tokens
        for s in self._sessions.values():
            if s.state == "decode":
                decode.append(s)
        budget -= len(decode)
        rows: list[_Row] = []
        for s in decode:
            if self.policy == "recompute":
                rows.append(_Row(s.slot, self._recompute_context(s, [s.next_input]), "last"))
            else:
                rows.append(_Row(s.slot, [s.next_input], "last"))
        for s in self._sessions.values():
            if s.state != "prefill" or budget <= 0:
                continue
            if self.policy == "recompute":
                ids, take = self._recompute_context(s, s.feed), len(s.feed)
            else:
                take = min(len(s.feed), self.max_chunk, budget)
                ids = s.feed[:take]
            done = take == len(s.feed)
            rows.append(_Row(s.slot, ids, "last" if done else "none"))
            prefill.append((s, take, done))
            budget -= len(ids)
        if not rows:
            return []
        logits = self._forward(rows)
        self.steps_run += 1

        outputs: list[TokenOutput] = []
        sampling: list[_Session] = []
        for s in decode:
            s.fed += 1
            s.next_input = None
            sampling.append(s)
        for s, take, done in prefill:
            del s.feed[:take]
            s.fed += take
            if done:
                s.state = "decode"
                sampling.append(s)
        if not sampling:
            return outputs
        row_of_slot = {row.slot: i for i, row in enumerate(rows) if row.logits == "last"}
        batch_logits = torch.stack([logits[row_of_slot[s.slot]][-1] for s in sampling])
        slots = torch.tensor([s.slot for s in sampling], device=self.device)
        need_seen = bool((self._penalty[slots] != 1.0).any())
        tokens = sample(
            batch_logits,
            self._temperature[slots],
            self._top_k[slots],
            self._top_p[slots],
            self._penalty[slots],
            self.slab.entry_token[slots] if need_seen else None,
            self._seed[slots],
            self._counter[slots],
        ).tolist()
        self._counter[slots] += 1
        for s, token in zip(sampling, tokens):
            outputs.append(self._emit(s, token))
        return outputs

    def _emit(self, s: _Session, token: int) -> TokenOutput:
        s.completion_tokens += 1
        s.next_input = token  # fed next step, or by the next message if the reply ends here
        s.turn_tokens.append(token)
        params = s.params
        if token in self.eos_ids and not params.ignore_eos:
            return self._finish(s, "eos", token, s.detok.flush())
        text, stopped = s.detok.add(token)
        if stopped:
            return self._finish(s, "stop", token, text)
        at_capacity = self.policy == "dense" and s.fed + len(s.feed) + 1 >= self.capacity
        if s.completion_tokens >= params.max_tokens or at_capacity:
            return self._finish(s, "length", token, text + s.detok.flush())
        return TokenOutput(session_id=s.id, token_id=token, text=text)

    def _recompute_context(self, s: _Session, new_ids: list[int]) -> list[int]:
        """Sliding window with re-computation: sinks + the window's ids, re-encoded from scratch."""
        held = self.slab.ordered_tokens(s.slot) + list(new_ids)
        if len(held) > self.capacity:
            held = held[: self.sinks] + held[len(held) - self.window :]
        self.slab.reset(s.slot)
        return held

    # ------------------------------------------------------------------ the batched forward

    def _forward(self, rows: list[_Row]) -> list[torch.Tensor | None]:
        """Runs every row's ids through the model in one forward; returns per row the logits asked for."""
        device = self.device
        sinks, window = self.sinks, self.window
        lengths = [len(r.ids) for r in rows]
        slots = torch.tensor([r.slot for r in rows], device=device)
        n_seen = self.slab.tokens_seen[slots]
        if self.policy == "dense":
            if bool((n_seen + torch.tensor(lengths, device=device) > window).any()):
                raise ContextOverflow(f"dense cache holds {window} tokens")
        else:
            self._maybe_rebase(slots, n_seen, lengths)
        base = self.slab.base[slots]

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
        write_slot, write_entry = slots[row_of_token], self.slab.write_index(position)

        logits_index, logits_rows = [], []
        cursor = 0
        for i, r in enumerate(rows):
            if r.logits == "all":
                logits_index.extend(range(cursor, cursor + lengths[i]))
            elif r.logits == "last":
                logits_index.append(cursor + lengths[i] - 1)
            logits_rows.append(len(logits_index))
            cursor += lengths[i]

        single = [i for i, n in enumerate(lengths) if n == 1]
        multi = [i for i, n in enumerate(lengths) if n > 1]
        batch = StepBatch(
            token_ids=token_ids,
            decode=self._decode_rows(single, starts, n_seen, cache_position, window_position, store_position,
                                     write_slot, write_entry, decode_only=not multi) if single else None,
            groups=[self._group(multi, lengths, starts, slots, n_seen, position)] if multi else [],
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        )
        if multi:
            chunk_rows = None if not single else torch.nonzero(lengths_t[row_of_token] > 1).squeeze(1)

            def chunk(x: torch.Tensor) -> torch.Tensor:
                return x if chunk_rows is None else x[chunk_rows]

            def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [n, 1, rot]: over heads
                return self.cos[positions][:, None], self.sin_signed[positions][:, None]

            batch.cos_cache, batch.sin_cache = tables(cache_position)
            batch.cos_window, batch.sin_window = tables(window_position)
            batch.chunk_rows = chunk_rows
            batch.cos_store, batch.sin_store = tables(chunk(store_position))
            batch.write_slot, batch.write_entry = chunk(write_slot), chunk(write_entry)
        logits = self.model(self.slab, batch) if logits_index else None
        if logits is None:
            self._forward_no_logits(batch)
        # Bookkeeping after the forward: entries now hold these tokens.
        self.slab.entry_position[write_slot, write_entry] = position
        self.slab.entry_token[write_slot, write_entry] = token_ids
        self.slab.tokens_seen.index_add_(0, slots, lengths_t)

        out: list[torch.Tensor | None] = []
        prev = 0
        for i, r in enumerate(rows):
            end = logits_rows[i]
            out.append(logits[prev:end] if (logits is not None and end > prev) else None)
            prev = end
        return out

    def _forward_no_logits(self, batch: StepBatch) -> None:
        # A step that only ingests still needs the layers run; ask for one row of logits and drop it.
        batch.logits_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model(self.slab, batch)

    def _group(self, members, lengths, starts, slots, n_seen, position) -> AttnGroup:
        device = self.device
        sinks, window = self.sinks, self.window
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
        ring_position = self.slab.entry_position[group_slots, sinks:]  # [B, W]
        ring = (ring_position >= 0)[:, None, :] & (t_q[:, :, None] - ring_position[:, None, :] <= window - 1)
        slot_range = _slot_range(group_slots)
        causal = arange_t[None, :, None] >= arange_t[None, None, :]  # [1, T(q), T(k)]
        key_valid = valid[:, None, :]
        chunk_sink = key_valid & causal & (t_q < sinks)[:, None, :]
        distance = t_q[:, :, None] - t_q[:, None, :]
        chunk_window = key_valid & causal & (t_q >= sinks)[:, None, :] & (distance <= window - 1)
        mask = torch.cat([sink_mask, chunk_sink, ring, chunk_window], dim=-1) & valid[:, :, None]
        mask[..., -1] |= ~mask.any(-1)  # padding queries: any key, result discarded (avoids NaN)
        ring_used = min(window, max(0, int(seen.max()) - sinks))  # entries are written in order until the ring wraps
        # Within one chunk every distance is below the window, so with no sinks and an empty ring the mask
        # is plain causal.
        chunk_only = sinks == 0 and ring_used == 0 and steps <= window
        return AttnGroup(group_slots, slot_range, tokens, valid, mask, chunk_only=chunk_only, ring_used=ring_used)

    def _decode_rows(self, members, starts, n_seen, cache_position, window_position, store_position,
                     write_slot, write_entry, decode_only: bool) -> DecodeRows:
        device, sinks = self.device, self.sinks
        idx = torch.tensor(members, device=device)
        rows = starts[idx]  # one token per member: its flat index
        group_slots, seen = write_slot[rows], n_seen[idx]
        slot_range = _slot_range(group_slots)
        # Entries are written in order (sinks, then the ring until it wraps), so once this token is written a
        # slot holds exactly its first `filled` entries.
        filled = (seen + 1).clamp(max=self.capacity)
        key_count, fewest = int(filled.max()), int(filled.min())
        mask = None
        if fewest < key_count:
            empty = torch.arange(key_count, device=device)[None, :] >= filled[:, None]
            mask = torch.zeros(empty.shape, dtype=self.dtype, device=device).masked_fill_(empty, float("-inf"))
        cache_pos, window_pos, store_pos = cache_position[rows], window_position[rows], store_position[rows]
        if sinks:
            cos_q = torch.stack([self.cos_query[cache_pos], self.cos_query[window_pos]], dim=1)
            sin_q = torch.stack([self.sin_query[cache_pos], self.sin_query[window_pos]], dim=1)
        else:
            cos_q, sin_q = self.cos_query[window_pos][:, None], self.sin_query[window_pos][:, None]
        return DecodeRows(
            rows=None if decode_only else rows,
            slots=group_slots,
            slot_range=slot_range,
            key_count=key_count,
            mask=mask,
            sink_columns=self.slab.sink_columns[:key_count] if sinks else None,
            cos_q=cos_q[:, None, :, None],
            sin_q=sin_q[:, None, :, None],
            cos_k=self.cos[store_pos][:, None],
            sin_k=self.sin_signed[store_pos][:, None],
            write_slot=group_slots,
            write_entry=write_entry[rows],
        )

    def _maybe_rebase(self, slots: torch.Tensor, n_seen: torch.Tensor, lengths: list[int]) -> None:
        last = n_seen + torch.tensor(lengths, device=self.device) - 1
        need = last - self.slab.base[slots] >= self.rope_positions
        if bool(need.any()):
            chosen = slots[need]
            new_base = (n_seen[need] - self.window).clamp(min=0)
            self.slab.rebase(chosen, new_base, self.inv_freq)

    # ------------------------------------------------------------------ scoring (perplexity)

    @torch.inference_mode()
    def stream_logits(self, ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Logits [len(ids), vocab] of ids streamed through a fresh slot, `chunk` tokens per forward."""
        chunk = min(chunk or self.max_chunk, self.max_chunk)
        slot = self._take_slot("__logits__")
        try:
            pieces = [self._forward([_Row(slot, ids[i : i + chunk], "all")])[0] for i in range(0, len(ids), chunk)]
        finally:
            self._release_slot(slot)
        return torch.cat(pieces).float()

    @torch.inference_mode()
    def score(self, ids: list[int], chunk: int | None = None, progress=None) -> list[float]:
        """Negative log-likelihood of ids[1:], each token predicted from the cache state before it
        (the paper's eval_long_ppl). Uses one free slot (recompute: all free slots, as a batch)."""
        if len(ids) < 2:
            raise InvalidRequest("need at least 2 tokens to score")
        if self.policy == "dense" and len(ids) > self.capacity:
            raise ContextOverflow(
                f"dense policy: {len(ids)} tokens exceed the cache capacity {self.capacity} "
                "(the model's context length unless --max-context is given)"
            )
        target = torch.tensor(ids[1:], device=self.device)
        nll = torch.empty(len(ids) - 1, dtype=torch.float64)
        self.max_entries_scored = 0
        if self.policy == "recompute":
            self._score_recompute(ids, target, nll, progress)
        else:
            chunk = min(chunk or self.max_chunk, self.max_chunk)
            slot = self._take_slot("__score__")
            try:
                for start in range(0, len(ids) - 1, chunk):
                    piece = ids[start : min(start + chunk, len(ids) - 1)]
                    logits = self._forward([_Row(slot, piece, "all")])[0]
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    tgt = target[start : start + len(piece)]
                    nll[start : start + len(piece)] = -logp.gather(1, tgt[:, None])[:, 0].double().cpu()
                    self.max_entries_scored = max(self.max_entries_scored, self.slab.entries(slot))
                    if progress is not None:
                        progress(len(piece))
            finally:
                self._release_slot(slot)
        return nll.tolist()

    def _score_recompute(self, ids, target, nll, progress) -> None:
        n_slots = self.free_slots
        if n_slots == 0:
            raise NoFreeSlot("scoring needs a free slot")
        taken = [self._take_slot("__score__") for _ in range(n_slots)]
        try:
            positions = list(range(len(ids) - 1))
            for start in range(0, len(positions), n_slots):
                batch_positions = positions[start : start + n_slots]
                rows = []
                for slot, t in zip(taken, batch_positions):
                    self.slab.reset(slot)
                    context = ids[: t + 1]
                    if len(context) > self.capacity:
                        context = context[: self.sinks] + context[len(context) - self.window :]
                    rows.append(_Row(slot, context, "last"))
                logits = self._forward(rows)
                self.max_entries_scored = max(self.max_entries_scored, max(len(r.ids) for r in rows))
                for t, row_logits in zip(batch_positions, logits):
                    logp = torch.log_softmax(row_logits[-1].float(), dim=-1)
                    nll[t] = -float(logp[target[t]])
                if progress is not None:
                    progress(len(batch_positions))
        finally:
            for slot in taken:
                self._release_slot(slot)


def _slot_range(slots: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when `slots` are consecutive (the slab is then sliced, not gathered), else None."""
    slot_list = slots.tolist()
    contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
    return (slot_list[0], slot_list[-1] + 1) if contiguous else None


def _eos_ids(hf_config: dict, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for value in (hf_config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _generation_eos(checkpoint: Path) -> list[int]:
    path = checkpoint / "generation_config.json"
    if not path.is_file():
        return []
    value = json.loads(path.read_text()).get("eos_token_id")
    return [value] if isinstance(value, int) else list(value or [])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device {name!r} asked for, but CUDA is not available")
    return device


def load_engine(config: EngineConfig) -> Engine:
    """Load the model and tokenizer named by `config` and build an engine around them."""
    from transformers import AutoTokenizer

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoint = resolve_checkpoint(config.model)
    device = resolve_device(config.device)
    if config.weights == "int4" and device.type != "cpu":
        raise InvalidRequest(f"weights=int4 runs torch's packed CPU kernel; device {device} needs weights=dense")
    model, hf_config = load_model(checkpoint, _DTYPES[config.dtype], device, config.weights, config.packed_max_rows)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    hf_config = dict(hf_config)
    gen_eos = _generation_eos(checkpoint)
    if gen_eos:
        current = hf_config.get("eos_token_id")
        hf_config["eos_token_id"] = list({*(current if isinstance(current, list) else [current]), *gen_eos} - {None})
    return Engine(config, model, hf_config, tokenizer, model_name=str(config.model))
