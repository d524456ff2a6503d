"""The engine facade: many chat sessions, one KV slab, one batched forward per step.

Pure torch: no Ray, no Redis. Not thread-safe; drive it from one thread. The work is done by its parts:
`sessions` (turn state machine), `residency` (which session holds which slot, parking), `scheduler` (what runs
this step), `runner` (the slab, forward and sampling), `output` (text deltas), `eval` (perplexity).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import torch

from sinkserve.config import EngineConfig
from sinkserve.engine import eval as scoring
from sinkserve.engine.chat_format import ChatFormat
from sinkserve.engine.kv_cache import SlabGeometry
from sinkserve.engine.output import Detokenizer, StepStats, TokenOutput
from sinkserve.engine.residency import Residency
from sinkserve.engine.runner import ModelRunner
from sinkserve.engine.scheduler import Scheduler
from sinkserve.engine.sessions import Session, SessionTable
from sinkserve.engine.capability import ExecutionPaths
from sinkserve.engine.step_inputs import RowInput
from sinkserve.errors import ContextOverflow, InvalidArgument, NoFreeSlot, SessionBusy
from sinkserve.protocol import GenerationParams, SessionView


class Engine:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, tokenizer, eos_ids: frozenset[int],
                 model_name: str, paths: ExecutionPaths | None = None, make_runner=ModelRunner):
        self.config, self.tokenizer, self.model_name, self.eos_ids = config, tokenizer, model_name, eos_ids
        self.paths = paths  # the dtype/weights/kernels chosen at load (engine/capability.py); None: built by hand
        args = model.args
        self.policy = config.policy
        sinks = 0 if config.policy in ("window", "dense") else config.sinks
        window = (config.max_context or args.max_context) if config.policy == "dense" else config.window
        if config.policy != "dense" and sinks + window > args.max_context:
            # Cache positions past the trained context would be out of distribution for the model.
            raise InvalidArgument(
                f"sinks + window = {sinks + window} exceeds the model's context length {args.max_context}"
            )
        self.sinks, self.window = sinks, window
        self.max_chunk = sinks + window if config.policy == "recompute" else min(config.prefill_chunk, window)
        geometry = SlabGeometry(args.n_layers, args.n_kv_heads, args.head_dim, sinks, window, config.slots)
        # make_runner(model, geometry, policy, max_chunk): ModelRunner, or a sharded runner (engine/shards.py)
        self.runner = make_runner(model, geometry, config.policy, self.max_chunk)
        self.residency = Residency(config.slots, config.park_host_bytes)
        self.scheduler = Scheduler(config.max_step_tokens, self.max_chunk, whole_messages=self.policy == "recompute",
                                   decode_stretch=config.decode_stretch, min_prefill_tokens=config.min_prefill_tokens)
        self.sessions = SessionTable()
        self.chat_format = ChatFormat(tokenizer)
        self.steps_run = 0
        self.last_step: StepStats | None = None  # what the latest step ran and where its time went

    def close(self) -> None:
        """Stop what the engine started (a sharded runner's other ranks); the engine is unusable after."""
        self.runner.close()

    # ------------------------------------------------------------------ geometry
    @property
    def slots(self) -> int:
        return self.residency.slots

    @property
    def free_slots(self) -> int:
        return self.residency.free_slots

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def bytes_per_session(self) -> int:
        return self.runner.bytes_per_slot

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: str | None = None, system_prompt: str | None = None, tag: int = 0) -> str:
        """A new session in a slot (parking an idle one if none is free); the system prompt goes in with the
        first message."""
        feed = self.chat_format.system_ids(system_prompt)
        return self._add(Session(self.sessions.new_id(session_id), tag, feed=feed, unlogged=list(feed))).id

    def import_session(self, session_id: str, transcript: list[int], total_tokens: int | None = None,
                       tag: int = 0) -> str:
        """Rebuild a session from its transcript: the first `sinks` and the last `window` ids are re-ingested
        (with the next message), which is what its cache held. With `total_tokens` (the transcript's length)
        `transcript` may be just its two ends, concatenated, so a long log need not be read whole."""
        vocab = self.runner.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in transcript):
            raise InvalidArgument("transcript holds ids outside the vocabulary")
        total = len(transcript) if total_tokens is None else total_tokens
        if total < len(transcript):
            raise InvalidArgument(f"total_tokens {total} is shorter than the {len(transcript)} ids given")
        if total > len(transcript) and len(transcript) < self.capacity:
            raise InvalidArgument(
                f"a partial transcript needs its first {self.sinks} and last {self.window} ids "
                f"({self.capacity} at least), got {len(transcript)}"
            )
        if self.policy == "dense" and total > self.capacity:
            raise ContextOverflow(f"transcript of {total} tokens exceeds dense capacity {self.capacity}")
        keep = list(transcript)
        if len(keep) > self.capacity or total > len(keep):
            keep = keep[: self.sinks] + keep[len(keep) - self.window :]
        session = Session(self.sessions.new_id(session_id), tag, feed=keep, seen_offset=total - len(keep))
        return self._add(session).id

    def _add(self, session: Session) -> Session:
        self._make_room()  # before anything changes: a refusal leaves no trace
        self.runner.reset_slot(self.residency.take_slot(session.id))
        return self.sessions.add(session)

    def close_session(self, session_id: str) -> None:
        self.sessions.get(session_id)
        self.sessions.remove(session_id)
        self.residency.forget(session_id)

    def has_session(self, session_id: str, tag: int | None = None) -> bool:
        session = self.sessions.find(session_id)
        return session is not None and (tag is None or session.tag == tag)

    def session_view(self, session_id: str) -> SessionView:
        s = self.sessions.get(session_id)
        entries = min(s.fed, self.sinks) + min(max(0, s.fed - self.sinks), self.window)
        return SessionView(
            session_id=s.id, replica="", resident=self.residency.is_resident(s.id),
            parked=self.residency.is_parked(s.id), busy=s.busy, cache_entries=entries,
            cache_capacity=self.capacity, tokens_seen=s.tokens_seen, turns=s.turns,
        )

    # ------------------------------------------------------------------ residency
    def acquire(self, session_id: str, tag: int) -> bool:
        """Make the session resident under `tag`: True when its cache is in a slot now (it was, or it was
        parked and is copied back); False when it must be rebuilt from its transcript (unknown here, held
        under another tag, or its parked cache was dropped). Raises NoFreeSlot when every slot is busy."""
        session = self.sessions.find(session_id)
        if session is not None and session.tag != tag:
            self.close_session(session_id)  # stale: another owner served it since
            session = None
        if session is None:
            return False
        if self.residency.is_resident(session_id):
            self.residency.touch(session_id)
        else:
            self._make_room()
            slot, state = self.residency.unpark(session_id)
            self.runner.import_slot(slot, state)
        return True

    def park(self, session_id: str) -> None:
        """Copy an idle resident session's cache to host memory and free its slot."""
        session = self.sessions.get(session_id)
        if session.busy:
            raise SessionBusy(f"session {session_id!r} is busy")
        slot = self.residency.slot(session_id)
        if slot is None:
            return
        state = self.runner.export_slot(slot)
        for dropped in self.residency.park(session_id, state, self.runner.state_nbytes(state)):
            self.sessions.remove(dropped)  # rebuilt from its transcript when it comes back

    def _make_room(self) -> None:
        if self.residency.free_slots:
            return
        victim = self.residency.victim(self.sessions.busy)
        if victim is None:
            raise NoFreeSlot(f"all {self.slots} KV slots hold sessions that are generating")
        self.park(victim)

    # ------------------------------------------------------------------ turns
    def add_message(self, session_id: str, text: str, params: GenerationParams | None = None) -> None:
        """Start a turn: queue the user message (and the assistant header) and reply to it."""
        s = self.sessions.get(session_id)
        if s.busy:
            raise SessionBusy(f"session {session_id!r} is still replying")
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument("message is empty")
        params = params or GenerationParams()
        if params.top_k > self.runner.vocab_size:
            raise InvalidArgument(f"top_k must be between 0 and the vocabulary size ({self.runner.vocab_size})")
        ids = self.chat_format.user_ids(text)
        if self.policy == "dense" and s.fed + len(s.feed) + len(ids) + params.max_tokens > self.capacity:
            raise ContextOverflow(
                f"dense cache holds {self.capacity} tokens; this turn would need "
                f"{s.fed + len(s.feed) + len(ids) + params.max_tokens}"
            )
        if not self.acquire(session_id, s.tag):
            raise AssertionError("a known session is always acquirable")
        seed = params.seed if params.seed is not None else self.config.seed
        seed = seed if seed is not None else secrets.randbits(31)
        s.start_turn(ids, params, seed, Detokenizer(self.tokenizer, params.stop))
        self.runner.set_sampling(self.residency.slot(session_id), params, seed)

    def abort_turn(self, session_id: str) -> TokenOutput | None:
        """Stop the session's reply now. The cache and the returned turn_tokens stay consistent: a message
        not fully ingested yet is still ingested with the next one (it is in the transcript)."""
        return self.sessions.get(session_id).abort(self.chat_format.close_ids)

    def has_work(self) -> bool:
        return self.sessions.any_busy()

    def pending_prompt_tokens(self) -> int:
        """Message ids queued for ingestion across all sessions that are ingesting."""
        return sum(len(s.feed) for s in self.sessions.all() if s.state == "prefill")

    def chat(self, session_id: str, text: str, params: GenerationParams | None = None) -> Iterator[TokenOutput]:
        """add_message + step() until the reply ends; yields this session's events. For single-driver use:
        events of other sessions stepped meanwhile are not delivered anywhere."""
        self.add_message(session_id, text, params)
        while True:
            for out in self.step():
                if out.session_id == session_id:
                    yield out
                    if out.finished:
                        return

    def step(self) -> list[TokenOutput]:
        """One batched forward over every session that is ingesting or generating."""
        self.last_step = None
        plan = self.scheduler.plan(self.sessions.all(), self.residency.slot)
        if not plan:
            return []
        recompute = self.policy == "recompute"
        inputs = [
            RowInput(row.slot, self.runner.recompute_context(row.slot, row.ids) if recompute else list(row.ids),
                     "last" if row.ends_prompt else "none")
            for row in plan.rows
        ]
        started = time.perf_counter()
        logits = self.runner.forward(inputs)
        forwarded = time.perf_counter()
        self.steps_run += 1
        sampling: list[tuple[Session, torch.Tensor]] = []
        for row, row_logits in zip(plan.rows, logits):
            session = self.sessions.get(row.session_id)
            if row.kind == "decode":
                session.decoded()
            elif not session.ingested(len(row.ids)):
                continue
            sampling.append((session, row_logits[-1]))
        outputs, sampled = [], forwarded
        if sampling:
            slots = [self.residency.slot(s.id) for s, _ in sampling]
            tokens = self.runner.sample(slots, torch.stack([row for _, row in sampling]))
            sampled = time.perf_counter()
            close = self.chat_format.close_ids
            outputs = [
                s.emit(token, self.eos_ids, close, self.policy == "dense" and s.fed + len(s.feed) + 1 >= self.capacity)
                for (s, _), token in zip(sampling, tokens)
            ]
        done = time.perf_counter()
        self.scheduler.observe(plan.decode_rows + plan.prefill_tokens, done - started)
        self.last_step = StepStats(plan.decode_rows, plan.prefill_tokens, forwarded - started, sampled - forwarded,
                                   done - sampled)
        return outputs

    # ------------------------------------------------------------------ scoring
    def score(self, ids: list[int], chunk: int | None = None, progress=None) -> scoring.ScoreResult:
        """Perplexity scoring on a scratch slab (never a serving slot); see engine/eval.py."""
        return scoring.score(self.runner, ids, min(chunk or self.max_chunk, self.max_chunk), progress)

    def stream_logits(self, ids: list[int], chunk: int | None = None) -> torch.Tensor:
        return scoring.stream_logits(self.runner, ids, min(chunk or self.max_chunk, self.max_chunk))
