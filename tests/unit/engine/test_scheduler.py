"""The step plan: decode rows first, prefill chunks within the step's token budget."""

from sinkserve.engine.output import Detokenizer
from sinkserve.engine.scheduler import Scheduler
from sinkserve.engine.sessions import Session
from sinkserve.protocol import GenerationParams


class LetterTokenizer:  # the scheduler is the subject: any decode will do
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def prefilling(sid: str, n: int) -> Session:
    s = Session(sid)
    s.start_turn(list(range(n)), GenerationParams(), seed=0, detok=Detokenizer(LetterTokenizer(), ()))
    return s


def decoding(sid: str, token: int) -> Session:
    s = prefilling(sid, 1)
    s.ingested(1)
    s.emit(token, frozenset(), [], at_capacity=False)
    return s


def slots(sessions):
    table = {s.id: i for i, s in enumerate(sessions)}
    return table.__getitem__


def test_decode_rows_are_never_delayed_by_a_long_prompt():
    sessions = [prefilling("long", 5000)] + [decoding(f"d{i}", 10 + i) for i in range(3)]
    plan = Scheduler(max_step_tokens=64, max_chunk=256).plan(sessions, slots(sessions))
    assert [r.session_id for r in plan.rows if r.kind == "decode"] == ["d0", "d1", "d2"]
    assert [r.ids for r in plan.rows if r.kind == "decode"] == [(10,), (11,), (12,)]
    # The long prompt gets what the budget leaves: 64 - 3 decode tokens, and the step holds no more.
    (chunk,) = [r for r in plan.rows if r.kind == "prefill"]
    assert len(chunk.ids) == 61 and not chunk.ends_prompt
    assert plan.decode_rows + plan.prefill_tokens == 64


def test_prefill_chunks_respect_the_chunk_size_and_share_the_budget():
    sessions = [prefilling("a", 300), prefilling("b", 10), prefilling("c", 10)]
    plan = Scheduler(max_step_tokens=270, max_chunk=256).plan(sessions, slots(sessions))
    assert [(r.session_id, len(r.ids), r.ends_prompt) for r in plan.rows] == [("a", 256, False), ("b", 10, True),
                                                                              ("c", 4, False)]


def test_a_full_budget_of_decode_rows_takes_no_prefill_and_idle_sessions_take_nothing():
    sessions = [decoding(f"d{i}", i) for i in range(4)] + [prefilling("p", 8), Session("idle")]
    plan = Scheduler(max_step_tokens=4, max_chunk=256).plan(sessions, slots(sessions))
    assert plan.decode_rows == 4 and plan.prefill_tokens == 0
    assert not Scheduler(8, 8).plan([Session("idle")], slots([Session("idle")]))


def test_ingesting_the_last_chunk_moves_the_session_to_decode():
    s = prefilling("a", 10)
    assert not s.ingested(6) and s.state == "prefill"
    assert s.ingested(4) and s.state == "decode" and s.fed == 10


def _fed(scheduler: Scheduler, fixed_s: float, per_token_s: float, sizes=(8, 64, 200, 30, 120, 16)) -> Scheduler:
    for tokens in sizes:
        scheduler.observe(tokens, fixed_s + per_token_s * tokens)
    return scheduler


def test_step_cost_fits_the_fixed_and_per_token_parts():
    fixed, per_token = _fed(Scheduler(2048, 256), 0.02, 0.005).cost.line()
    assert abs(fixed - 0.02) < 1e-9 and abs(per_token - 0.005) < 1e-9
    # Steps all of one size give no slope: the whole step counts per token (the cautious reading).
    same = _fed(Scheduler(2048, 256), 0.02, 0.005, sizes=(64,) * 5).cost.line()
    assert same[0] == 0.0 and abs(same[1] - (0.02 + 0.005 * 64) / 64) < 1e-12


def test_a_long_prompt_stretches_a_decode_step_at_most_by_the_stated_factor():
    # CPU-like cost, every token the same price: 32 decode rows and 2x stretch leave 32 prompt tokens.
    scheduler = _fed(Scheduler(2048, 256, decode_stretch=2.0, min_prefill_tokens=4), 0.0, 0.01)
    sessions = [prefilling("long", 5000)] + [decoding(f"d{i}", i) for i in range(32)]
    plan = scheduler.plan(sessions, slots(sessions))
    assert plan.decode_rows == 32 and plan.prefill_tokens == 32
    decode_only = scheduler.cost.seconds(32)
    assert scheduler.cost.seconds(plan.decode_rows + plan.prefill_tokens) <= 2.0 * decode_only + 1e-9
    # GPU-like cost, a large fixed part per step: the same stretch admits far more prompt tokens.
    wide = _fed(Scheduler(2048, 256, decode_stretch=2.0), 0.05, 0.0001)
    assert wide.plan(sessions, slots(sessions)).prefill_tokens == 256  # the chunk size binds, not the budget


def test_prefill_never_starves_and_idle_decode_or_an_unmeasured_engine_use_the_hard_cap():
    scheduler = Scheduler(2048, 256, decode_stretch=1.0, min_prefill_tokens=16)
    sessions = [prefilling("long", 5000)] + [decoding(f"d{i}", i) for i in range(8)]
    # Nothing measured yet: only max_step_tokens bounds the step.
    assert scheduler.plan(sessions, slots(sessions)).prefill_tokens == 256
    _fed(scheduler, 0.0, 0.01)
    # A stretch of 1 leaves nothing for prompts but the floor.
    assert scheduler.plan(sessions, slots(sessions)).prefill_tokens == 16
    # No reply decoding: nothing to protect, prompts take the whole budget.
    only_prefill = [prefilling("a", 300), prefilling("b", 300)]
    assert scheduler.plan(only_prefill, slots(only_prefill)).prefill_tokens == 512
