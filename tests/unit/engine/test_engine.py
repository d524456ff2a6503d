"""Engine behaviour: batching, bounded memory, sessions, sampling, bad input."""

import psutil
import pytest
import torch
from pydantic import ValidationError

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.errors import InvalidArgument, NoFreeSlot, SessionBusy, SessionExists, SessionNotFound
from sinkserve.protocol import GenerationParams
from sinkserve.engine.testing import random_ids


def run_turn(engine, sid, text, **params):
    outs = list(engine.chat(sid, text, GenerationParams(**params)))
    return outs


def test_batched_decode_equals_each_session_alone(make_engine):
    prompts = ["hi", "tell me a long story about " + "dragons " * 20, "a medium sized message " * 5]
    params = dict(max_tokens=40, ignore_eos=True)

    alone = []
    for i, text in enumerate(prompts):
        engine = make_engine()
        sid = engine.open_session(system_prompt=f"system {i}" * (i + 1))
        alone.append([o.token_id for o in run_turn(engine, sid, text, **params)])

    engine = make_engine()
    sids = [engine.open_session(system_prompt=f"system {i}" * (i + 1)) for i in range(len(prompts))]
    for sid, text in zip(sids, prompts):
        engine.add_message(sid, text, GenerationParams(**params))
    together = {sid: [] for sid in sids}
    batch_sizes = []
    while engine.has_work():
        outs = engine.step()
        batch_sizes.append(len(outs))
        for out in outs:
            together[out.session_id].append(out.token_id)
    assert max(batch_sizes) == 3  # really decoded in one batch
    assert [together[sid] for sid in sids] == alone


@pytest.mark.slow
def test_hundred_thousand_tokens_bounded_memory(make_engine):
    engine = make_engine(sinks=4, window=32, slots=1, prefill_chunk=32)
    k_ptr, v_ptr, slab_bytes = engine.runner.slab.k.data_ptr(), engine.runner.slab.v.data_ptr(), engine.runner.slab.nbytes
    process = psutil.Process()
    sid = engine.open_session()
    slot = engine.residency.slot(sid)

    def ingest(words):
        engine.add_message(sid, "lorem " * words, GenerationParams(max_tokens=1))
        max_entries = 0
        while engine.has_work():
            engine.step()
            max_entries = max(max_entries, engine.runner.slab.entries(slot))
        return max_entries

    assert ingest(10_000) == 36  # warm-up; the cache fills to sinks + window and stays there
    rss_warm = process.memory_info().rss
    assert ingest(90_000) == 36
    rss_end = process.memory_info().rss
    info = engine.session_view(sid)
    assert info.tokens_seen >= 100_000
    assert info.cache_entries == 36
    assert (engine.runner.slab.k.data_ptr(), engine.runner.slab.v.data_ptr()) == (k_ptr, v_ptr)  # never reallocated
    assert engine.runner.slab.nbytes == slab_bytes
    assert rss_end - rss_warm < 64 * 2**20  # 90k more tokens add no per-token state
    # And through the decode path: a long reply keeps the cache at sinks + window.
    outs = list(engine.chat(sid, "go", GenerationParams(max_tokens=1000, ignore_eos=True, temperature=1.0, seed=3)))
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 1000
    assert engine.session_view(sid).cache_entries == engine.runner.slab.entries(slot) == 36


def test_scoring_never_holds_more_than_sinks_plus_window(make_engine):
    engine = make_engine(sinks=4, window=32, slots=1, prefill_chunk=32)
    result = engine.score(random_ids(2000, seed=5))
    assert len(result.nll) == 1999 and result.max_entries == 36
    assert engine.free_slots == 1  # scoring ran on a scratch slab, not a serving slot


def test_bytes_per_session_is_fixed_and_reported(make_engine):
    engine = make_engine(sinks=4, window=60)
    cfg = engine.runner.args
    assert engine.bytes_per_session == 2 * cfg.n_layers * cfg.n_kv_heads * 64 * cfg.head_dim * 4
    assert engine.runner.slab.nbytes == engine.bytes_per_session * engine.slots


def test_multi_turn_transcript_rebuilds_same_cache(make_engine):
    engine = make_engine(sinks=4, window=32)
    sid = engine.open_session(system_prompt="be brief")
    transcript = []
    for i in range(6):
        final = run_turn(engine, sid, f"message number {i} " * 3, max_tokens=12, ignore_eos=True)[-1]
        transcript += final.turn_tokens
    info = engine.session_view(sid)
    assert info.turns == 6 and info.cache_entries == 36
    # The transcript is exactly the token stream: rebuilding ingests its sinks + last window ids.
    twin = make_engine(sinks=4, window=32)
    twin.import_session("copy", transcript)
    a = run_turn(engine, sid, "next", max_tokens=8, ignore_eos=True)
    b = run_turn(twin, "copy", "next", max_tokens=8, ignore_eos=True)
    assert len(a) == len(b) == 8
    assert twin.session_view("copy").cache_entries == 36
    assert twin.session_view("copy").tokens_seen == engine.session_view(sid).tokens_seen
    # The log's two ends are enough (what a replica reads from Redis): the same cache, the same next turn.
    ends = make_engine(sinks=4, window=32)
    ends.import_session("ends", transcript[:10] + transcript[-40:], total_tokens=len(transcript))
    c = run_turn(ends, "ends", "next", max_tokens=8, ignore_eos=True)
    assert [o.token_id for o in c] == [o.token_id for o in b]
    assert ends.session_view("ends").tokens_seen == twin.session_view("copy").tokens_seen
    with pytest.raises(InvalidArgument, match="partial transcript needs its first 4 and last 32 ids"):
        ends.import_session("short", transcript[:10], total_tokens=len(transcript))
    with pytest.raises(InvalidArgument, match="shorter than"):
        ends.import_session("short", transcript, total_tokens=3)
    assert "short" not in ends.sessions


def test_transcript_without_eviction_reproduces_exactly(make_engine):
    engine = make_engine(sinks=4, window=500)
    sid = engine.open_session()
    transcript = []
    for i in range(3):
        transcript += run_turn(engine, sid, f"turn {i}", max_tokens=10, ignore_eos=True)[-1].turn_tokens
    twin = make_engine(sinks=4, window=500)
    twin.import_session("copy", transcript)
    a = [o.token_id for o in run_turn(engine, sid, "again", max_tokens=10, ignore_eos=True)]
    b = [o.token_id for o in run_turn(twin, "copy", "again", max_tokens=10, ignore_eos=True)]
    assert a == b


def test_park_and_unpark_are_bit_exact(make_engine):
    engine = make_engine(slots=2)
    sid = engine.open_session()
    run_turn(engine, sid, "hello there", max_tokens=50, ignore_eos=True)
    reference = make_engine(slots=2)
    rid = reference.open_session()
    run_turn(reference, rid, "hello there", max_tokens=50, ignore_eos=True)

    engine.park(sid)
    assert engine.free_slots == 2 and engine.session_view(sid).parked
    other = engine.open_session()  # the freed slot is reused meanwhile
    run_turn(engine, other, "someone else", max_tokens=5)
    a = [o.token_id for o in run_turn(engine, sid, "continue", max_tokens=20, ignore_eos=True)]
    b = [o.token_id for o in run_turn(reference, rid, "continue", max_tokens=20, ignore_eos=True)]
    assert a == b


def test_sampling_seed_reproducible_and_params_respected(make_engine):
    engine = make_engine()
    params = dict(max_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    sid = engine.open_session()
    first = [o.token_id for o in run_turn(engine, sid, "x", **params)]
    engine2 = make_engine()
    sid2 = engine2.open_session()
    other = engine2.open_session()  # a neighbour in the batch must not change a seeded stream
    engine2.add_message(other, "noise", GenerationParams(max_tokens=30, temperature=1.5, seed=9))
    second = [o.token_id for o in run_turn(engine2, sid2, "x", **params)]
    assert first == second
    e_other = make_engine()
    different = [o.token_id for o in run_turn(e_other, e_other.open_session(), "x", **{**params, "seed": 99})]
    assert different != first
    # top_k=1 is greedy whatever the temperature
    e3 = make_engine()
    s3 = e3.open_session()
    greedy = [o.token_id for o in run_turn(e3, s3, "y", max_tokens=10, ignore_eos=True)]
    e4 = make_engine()
    s4 = e4.open_session()
    topk1 = [o.token_id for o in run_turn(e4, s4, "y", max_tokens=10, ignore_eos=True, temperature=2.0, top_k=1, seed=5)]
    assert greedy == topk1


def test_repetition_penalty_changes_greedy_choice(make_engine):
    e1, e2 = make_engine(), make_engine()
    s1, s2 = e1.open_session(), e2.open_session()
    plain = [o.token_id for o in run_turn(e1, s1, "repeat repeat repeat", max_tokens=30, ignore_eos=True)]
    penal = [o.token_id for o in run_turn(e2, s2, "repeat repeat repeat", max_tokens=30, ignore_eos=True, repetition_penalty=5.0)]
    assert plain != penal
    assert len(set(penal)) >= len(set(plain))


def test_stop_strings_and_eos(make_engine):
    engine = make_engine()
    sid = engine.open_session()
    outs = run_turn(engine, sid, "z", max_tokens=60, ignore_eos=True)
    text = "".join(o.text for o in outs)
    assert len(text) > 10
    stop = text[5:8]
    e2 = make_engine()
    s2 = e2.open_session()
    stopped = run_turn(e2, s2, "z", max_tokens=60, ignore_eos=True, stop=[stop])
    stopped_text = "".join(o.text for o in stopped)
    assert stopped[-1].finish_reason == "stop"
    assert stop not in stopped_text and text.startswith(stopped_text)
    # EOS ends the reply with finish_reason eos (force it: the tiny model's EOS id is 2).
    e3 = make_engine()
    s3 = e3.open_session()
    e3.eos_ids = frozenset(range(49152))  # a public field: the ids that end a reply
    outs = run_turn(e3, s3, "z", max_tokens=60)
    assert len(outs) == 1 and outs[0].finish_reason == "eos"


def test_abort_keeps_transcript_consistent(make_engine):
    engine = make_engine()
    sid = engine.open_session()
    engine.add_message(sid, "a long message " * 10, GenerationParams(max_tokens=100, ignore_eos=True))
    produced = []
    for _ in range(30):
        produced += [o.token_id for o in engine.step() if o.session_id == sid]
    final = engine.abort_turn(sid)
    assert final.finished and final.finish_reason == "aborted"
    assert final.completion_tokens == len(produced)
    # Everything streamed is in the transcript, in order, followed by the template's close.
    assert final.turn_tokens[-len(engine.chat_format.close_ids) - len(produced) :][: len(produced)] == produced
    assert not engine.session_view(sid).busy
    assert run_turn(engine, sid, "still alive?", max_tokens=3)[-1].finished


def test_bad_input_gets_clear_errors_and_leaks_nothing(make_engine, tiny_llama):
    engine = make_engine(slots=2)
    sid = engine.open_session()
    with pytest.raises(InvalidArgument, match="empty"):
        engine.add_message(sid, "   ")
    with pytest.raises(InvalidArgument, match="max_tokens"):
        engine.add_message(sid, "hi", GenerationParams(max_tokens=0))
    with pytest.raises(InvalidArgument, match="top_p"):
        engine.add_message(sid, "hi", GenerationParams(top_p=0))
    with pytest.raises(InvalidArgument, match="temperature"):
        GenerationParams(temperature=float("nan"))
    assert not engine.session_view(sid).busy  # the failed calls started nothing
    with pytest.raises(SessionNotFound, match="nope"):
        engine.add_message("nope", "hi")
    with pytest.raises(SessionNotFound):
        engine.close_session("nope")
    engine.open_session("second")
    third = engine.open_session()  # no free slot: the least recently used idle session is parked for it
    assert engine.session_view(sid).parked and engine.free_slots == 0 and len(engine.sessions) == 3
    engine.close_session(third)
    engine.add_message(sid, "hi", GenerationParams(max_tokens=5))  # unparked into the freed slot
    engine.add_message("second", "hi", GenerationParams(max_tokens=5))
    with pytest.raises(NoFreeSlot):  # every slot is generating: nothing to park
        engine.open_session()
    assert engine.free_slots == 0 and len(engine.sessions) == 2
    with pytest.raises(SessionBusy):
        engine.add_message(sid, "again")
    engine.abort_turn("second")
    with pytest.raises(SessionExists, match="already exists"):
        engine.open_session("second")
    engine.close_session("second")
    assert engine.free_slots == 1
    with pytest.raises(InvalidArgument, match="vocabulary"):
        engine.import_session("bad", [1, 2, -5])
    assert engine.free_slots == 1  # nothing taken by the refused import

    base = dict(model=str(tiny_llama), device="cpu")
    with pytest.raises(ValidationError, match="sinks"):
        EngineConfig(**base, sinks=-1)
    with pytest.raises(ValidationError, match="window"):
        EngineConfig(**base, window=0)
    with pytest.raises(ValidationError, match="policy"):
        EngineConfig(**base, policy="lru")
    with pytest.raises(InvalidArgument, match="context length"):
        load_engine(EngineConfig(**base, sinks=8192, window=4))


def test_unsupported_architecture_names_supported_ones(tmp_path, tiny_llama):
    import json
    import shutil

    from sinkserve.errors import UnsupportedModel

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"], config["model_type"] = ["BertModel"], "bert"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM.*GPTNeoXForCausalLM"):
        load_engine(EngineConfig(model=str(bad), device="cpu"))


def test_dense_policy_refuses_past_capacity(make_engine):
    engine = make_engine(policy="dense", max_context=64)
    from sinkserve.errors import ContextOverflow

    with pytest.raises(ContextOverflow):
        engine.score(random_ids(100))
    sid = engine.open_session()
    with pytest.raises(ContextOverflow):
        engine.add_message(sid, "word " * 80)
    assert len(engine.score(random_ids(64)).nll) == 63


def test_policies_differ_and_recompute_matches_fresh_encoding(make_engine):
    ids = random_ids(120, seed=7)
    streaming = make_engine(sinks=4, window=32).score(ids).nll
    window = make_engine(policy="window", window=36).score(ids).nll
    recompute = make_engine(policy="recompute", sinks=4, window=32).score(ids).nll
    dense = make_engine(policy="dense").score(ids).nll
    # Before anything is evicted every policy sees the same keys.
    for other in (window, recompute):
        assert torch.allclose(torch.tensor(other[:30]), torch.tensor(dense[:30]), atol=1e-4)
    assert streaming[:30] == pytest.approx(dense[:30], abs=1e-4)
    # After eviction they differ.
    assert streaming[60:] != pytest.approx(recompute[60:], abs=1e-4)
    assert streaming[60:] != pytest.approx(window[60:], abs=1e-4)
    # Recompute at token t is a fresh forward over sinks + last window tokens.
    engine = make_engine(policy="dense")
    t = 100
    context = ids[:4] + ids[t + 1 - 32 : t + 1]
    logits = engine.stream_logits(context)
    fresh = -torch.log_softmax(logits[-1], -1)[ids[t + 1]].item()
    assert recompute[t] == pytest.approx(fresh, abs=1e-4)


def test_sinkless_recompute_and_first_window_chunk_match_fresh_encoding(make_engine):
    """Without sinks, a chunk over an empty ring takes the fused causal path: it must score exactly like
    the general path (a dense engine's fresh forward over the same tokens)."""
    ids = random_ids(100, seed=11)
    recompute = make_engine(policy="recompute", sinks=0, window=24).score(ids).nll
    window = make_engine(policy="window", window=24).score(ids).nll
    dense = make_engine(policy="dense").score(ids).nll
    assert torch.allclose(torch.tensor(recompute[:20]), torch.tensor(dense[:20]), atol=1e-4)
    assert torch.allclose(torch.tensor(window[:20]), torch.tensor(dense[:20]), atol=1e-4)
    engine = make_engine(policy="dense")
    for t in (40, 77, 98):
        logits = engine.stream_logits(ids[t + 1 - 24 : t + 1])
        fresh = -torch.log_softmax(logits[-1], -1)[ids[t + 1]].item()
        assert recompute[t] == pytest.approx(fresh, abs=1e-4)


def test_a_full_engine_parks_the_least_recently_used_idle_session_and_resumes_it_exactly(make_engine):
    engine = make_engine(slots=2)
    reference = make_engine(slots=2)
    a, b = engine.open_session("a"), engine.open_session("b")
    ref = reference.open_session("a")
    run_turn(engine, a, "first", max_tokens=6, ignore_eos=True)
    run_turn(reference, ref, "first", max_tokens=6, ignore_eos=True)
    run_turn(engine, b, "second", max_tokens=6, ignore_eos=True)
    engine.open_session("c")  # no free slot: "a" (used longest ago, idle) is parked
    assert engine.session_view("a").parked and not engine.session_view("b").parked
    assert engine.acquire("a", tag=0)  # copied back: "b" is parked for it now
    assert engine.session_view("b").parked and engine.residency.stats.unparks == 1
    got = [o.token_id for o in run_turn(engine, a, "again", max_tokens=8, ignore_eos=True)]
    want = [o.token_id for o in run_turn(reference, ref, "again", max_tokens=8, ignore_eos=True)]
    assert got == want


def test_acquire_under_another_tag_or_after_a_budget_drop_asks_for_a_rebuild(make_engine):
    engine = make_engine(slots=1, park_host_bytes=0)
    engine.open_session("s", tag=3)
    assert engine.acquire("s", tag=3)
    assert not engine.acquire("s", tag=4)  # held under an older tag: dropped, to be rebuilt from the log
    assert "s" not in engine.sessions and engine.free_slots == 1
    assert not engine.acquire("unknown", tag=0)
    engine.open_session("x", tag=1)
    engine.open_session("y", tag=1)  # parking "x" with no host budget drops it
    assert not engine.has_session("x") and engine.residency.stats.drops == 1
    assert not engine.acquire("x", tag=1)
