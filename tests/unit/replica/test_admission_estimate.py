"""The overload estimate a replica refuses early by (issue 11 item 12, issue 17): pure arithmetic on a snapshot."""

from __future__ import annotations

from sinkserve.replica.loop import EngineSnapshot, LoopTotals
from sinkserve.replica.turns import ACCEPT_SHARE, TurnTotals, first_token_estimate_s, turn_estimate_s


def snapshot(busy: int, pending: int, step_s: float | None, prefill_tps: float | None,
             tps: float | None = None) -> EngineSnapshot:
    return EngineSnapshot(slots=64, free_slots=0, resident=64, parked=0, busy=busy, parks=0, unparks=0, drops=0,
                          steps=100, pending_prompt_tokens=pending, step_s=step_s, prefill_tokens_per_s=prefill_tps,
                          totals=LoopTotals(), tokens_per_s=tps)


def test_a_turn_behind_more_work_than_its_deadline_allows_is_estimated_past_it():
    # The collapse seen at 200 chats on one AVX2 replica: ~85 tokens/s of engine throughput, 60 turns running,
    # 3,000 prompt tokens queued: 3,000 + 40 + 31 x 16 tokens of work ahead is ~42 s, past 80% of 60 s... and
    # the prompt queue alone already is 35 s: the first-token estimate is a lower bound of the whole turn's.
    overloaded = snapshot(busy=60, pending=3_000, step_s=6.8, prefill_tps=80.0, tps=85.0)
    estimate = turn_estimate_s(overloaded, 120, new_tokens=16)
    assert estimate >= first_token_estimate_s(overloaded, 120) > 35
    assert estimate > ACCEPT_SHARE * 60
    # The same engine with little queued finishes a turn in time: work, not a long step, decides.
    healthy = snapshot(busy=20, pending=200, step_s=2.0, prefill_tps=80.0, tps=85.0)
    assert turn_estimate_s(healthy, 120, new_tokens=16) < ACCEPT_SHARE * 60


def test_an_idle_engine_never_refuses_on_a_stale_step_time():
    # After a burst the step-time average stays high until the next step: with nothing running it is not used.
    idle = snapshot(busy=0, pending=0, step_s=30.0, prefill_tps=80.0, tps=85.0)
    assert turn_estimate_s(idle, 120, new_tokens=16) == first_token_estimate_s(idle, 120) < 3
    unmeasured = snapshot(busy=3, pending=0, step_s=None, prefill_tps=None)
    assert turn_estimate_s(unmeasured, 120, new_tokens=16) == 0.0


def test_expected_tokens_follow_the_turns_that_finished_capped_by_the_request():
    totals = TurnTotals()
    assert totals.expected_tokens(4) == 4 and totals.expected_tokens(1000) == 16  # before any history
    totals.add({"decode_s": 1.0}, completion_tokens=10)
    totals.add({"decode_s": 1.0}, completion_tokens=30)
    assert totals.expected_tokens(100_000) == 20  # an endless max_tokens expects what turns here produced
    assert totals.expected_tokens(8) == 8
