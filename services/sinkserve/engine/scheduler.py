"""Which sessions run in the next step, and with which ids: a `StepPlan`. No torch here.

Decode rows go first (one token each, so a long prompt never stalls a reply), then prefill chunks fill what is
left of the step's token budget: each session's chunk is at most `max_chunk` ids of its message. The budget is
`max_step_tokens`, cut while replies are decoding so that the step takes at most `decode_stretch` times a
decode-only step at the measured cost per token (`StepCost`): inter-token latency stays bounded while long prompts
stream in, as in vLLM's chunked-prefill scheduler, but sized to what this machine measures rather than a fixed
count (on a CPU each token costs about the same, on a GPU a step's fixed cost dominates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sinkserve.engine.sessions import Session

RowKind = Literal["decode", "prefill"]


@dataclass(frozen=True)
class ScheduledRow:
    session_id: str
    slot: int
    kind: RowKind
    ids: tuple[int, ...]  # what the session feeds (recompute: only the new ids; the runner adds the context)
    ends_prompt: bool  # the row's last id is the message's last: its logits give the reply's first token


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[ScheduledRow, ...]

    @property
    def decode_rows(self) -> int:
        return sum(1 for r in self.rows if r.kind == "decode")

    @property
    def prefill_tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows if r.kind == "prefill")

    def __bool__(self) -> bool:
        return bool(self.rows)


@dataclass
class StepCost:
    """A step's wall time as `fixed_s + per_token_s * tokens`, fitted by least squares over recent steps with
    exponential forgetting (each new step weighs 1, older ones `decay` times less per step)."""

    decay: float = 0.95
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        d = self.decay
        self._w = d * self._w + 1
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds

    @property
    def measured(self) -> bool:
        return self._w > 0

    def line(self) -> tuple[float, float]:
        """(fixed_s, per_token_s). With too little spread in step sizes to fit a slope, all of a step's time is
        taken as per token: the cautious reading (it cuts prefill the most)."""
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if var > max(1.0, 0.01 * mean_x * mean_x):  # step sizes spread by a tenth of their mean or more
            slope = (self._xy / self._w - mean_x * mean_y) / var
            fixed = mean_y - slope * mean_x
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, mean_y / mean_x

    def seconds(self, tokens: int) -> float:
        fixed, per_token = self.line()
        return fixed + per_token * tokens

    def tokens_within(self, seconds: float) -> int:
        fixed, per_token = self.line()
        return int(max(0.0, seconds - fixed) / per_token)


class Scheduler:
    def __init__(self, max_step_tokens: int, max_chunk: int, whole_messages: bool = False,
                 decode_stretch: float | None = None, min_prefill_tokens: int = 1):
        self.max_step_tokens = max_step_tokens
        self.max_chunk = max_chunk
        # recompute re-encodes the cache every step: a message goes in whole, whatever the budget
        self.whole_messages = whole_messages
        self.decode_stretch = decode_stretch  # None: only max_step_tokens bounds a step
        self.min_prefill_tokens = min_prefill_tokens  # ingestion never stops while replies decode
        self.cost = StepCost()

    def token_budget(self, decode_rows: int) -> int:
        """Tokens (decode rows included) the next step may hold."""
        if not decode_rows or self.decode_stretch is None or not self.cost.measured:
            return self.max_step_tokens
        allowed = self.cost.tokens_within(self.decode_stretch * self.cost.seconds(decode_rows))
        return min(self.max_step_tokens, max(allowed, decode_rows + self.min_prefill_tokens))

    def observe(self, tokens: int, seconds: float) -> None:
        """A step of `tokens` (decode rows + prefill ids) took `seconds` of wall time."""
        self.cost.observe(tokens, seconds)

    def plan(self, sessions: list[Session], slot_of) -> StepPlan:
        """`slot_of(session_id)` is the session's KV slot (every busy session is resident)."""
        rows: list[ScheduledRow] = []
        for s in sessions:
            if s.state == "decode":
                rows.append(ScheduledRow(s.id, slot_of(s.id), "decode", (s.turn.next_input,), ends_prompt=True))
        budget = self.token_budget(len(rows)) - len(rows)
        for s in sessions:
            if s.state != "prefill" or budget <= 0:
                continue
            take = len(s.feed) if self.whole_messages else min(len(s.feed), self.max_chunk, budget)
            rows.append(ScheduledRow(s.id, slot_of(s.id), "prefill", tuple(s.feed[:take]), take == len(s.feed)))
            budget -= take
        return StepPlan(tuple(rows))
