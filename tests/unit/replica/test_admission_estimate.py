"""The overload estimate a replica refuses early by (issue 11 item 12, issue 17): pure arithmetic on a snapshot."""

from __future__ import annotations

from sinkserve.replica.loop import EngineSnapshot, LoopTotals
from sinkserve.replica.turns import ACCEPT_SHARE, Calibration, TurnTotals, first_token_estimate_s, turn_estimate_s


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


def test_a_turn_gets_one_token_a_step_and_waits_for_a_slot_when_every_slot_generates():
    # The sweep's failure at 200 chats: little queued work, high throughput in aggregate, yet a turn's 16 tokens
    # come one per 1.5 s step, and 80 accepted turns wait for one of 64 busy slots. Throughput alone said ~12 s.
    busy = snapshot(busy=64, pending=100, step_s=1.5, prefill_tps=60.0, tps=60.0)
    alone = turn_estimate_s(busy, 120, new_tokens=16)
    assert alone >= 16 * 1.5  # its own tokens, one a step
    queued = turn_estimate_s(busy, 120, new_tokens=16, waiting=80)
    own = first_token_estimate_s(busy, 120) + 16 * 1.5
    assert abs(queued - (81 * own / 64 + own)) < 1e-9  # 81 turns ahead of a slot, 64 slots ending in turn
    assert queued > ACCEPT_SHARE * 60 > alone
    # The fitted step cost scales the measured step to the batch the turn will share: 20 running, 30 waiting.
    growing = EngineSnapshot(**{**busy.__dict__, "busy": 20, "step_cost": (0.1, 0.02)})
    step_then = 1.5 * (0.1 + 0.02 * 51) / (0.1 + 0.02 * 20)
    assert abs(turn_estimate_s(growing, 120, 16, waiting=30) - (first_token_estimate_s(growing, 120)
                                                                + 16 * step_then)) < 1e-9


def test_calibration_follows_measured_turns_and_cut_offs_only_raise_it():
    calibration = Calibration()
    for _ in range(50):
        calibration.observe(estimated_s=10.0, actual_s=20.0)
    assert 1.9 < calibration.ratio <= 2.0
    before = calibration.ratio
    calibration.observe(estimated_s=10.0, actual_s=5.0, cut_off=True)  # hung up early: says nothing
    calibration.observe(estimated_s=0.2, actual_s=30.0)  # too short an estimate to learn from
    assert calibration.ratio == before
    calibration.observe(estimated_s=10.0, actual_s=60.0, cut_off=True)  # ran to its deadline: at least that long
    assert calibration.ratio > before
    for _ in range(200):
        calibration.observe(estimated_s=10.0, actual_s=1000.0)
    assert calibration.ratio <= calibration.high
    for _ in range(100):  # an estimate five times too long is learnt, so it stops refusing turns that would finish
        calibration.observe(estimated_s=40.0, actual_s=8.0)
    assert 0.19 < calibration.ratio < 0.22
