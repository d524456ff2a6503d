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
