"""Which sessions run in the next step, and with which ids: a `StepPlan`. No torch here.

Decode rows go first (one token each, so a long prompt never stalls a reply), then prefill chunks fill what is
left of `max_step_tokens`: each session's chunk is at most `max_chunk` ids of its message.
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


class Scheduler:
    def __init__(self, max_step_tokens: int, max_chunk: int, whole_messages: bool = False):
        self.max_step_tokens = max_step_tokens
        self.max_chunk = max_chunk
        # recompute re-encodes the cache every step: a message goes in whole, whatever the budget
        self.whole_messages = whole_messages

    def plan(self, sessions: list[Session], slot_of) -> StepPlan:
        """`slot_of(session_id)` is the session's KV slot (every busy session is resident)."""
        rows: list[ScheduledRow] = []
        for s in sessions:
            if s.state == "decode":
                rows.append(ScheduledRow(s.id, slot_of(s.id), "decode", (s.turn.next_input,), ends_prompt=True))
        budget = self.max_step_tokens - len(rows)
        for s in sessions:
            if s.state != "prefill" or budget <= 0:
                continue
            take = len(s.feed) if self.whole_messages else min(len(s.feed), self.max_chunk, budget)
            rows.append(ScheduledRow(s.id, slot_of(s.id), "prefill", tuple(s.feed[:take]), take == len(s.feed)))
            budget -= take
        return StepPlan(tuple(rows))
