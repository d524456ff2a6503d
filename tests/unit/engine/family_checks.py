"""What every model family's test module checks the same way: the engine on a tiny checkpoint, HF's model on it,
and the serving checks (batched decode, parking, rebuild) that hold for any family. A family's module builds its
checkpoints and passes `make(**overrides) -> engine` for one of them."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.protocol import GenerationParams


def engine_for(path, **overrides):
    fields = dict(model=str(path), sinks=4, window=32, slots=4, device="cpu", prefill_chunk=16, num_threads=1,
                  dtype="float32", weights="dense")
    fields.update(overrides)
    return load_engine(EngineConfig(**fields))


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def turn(engine, sid, text, **params) -> list[int]:
    return [o.token_id for o in engine.chat(sid, text, GenerationParams(**params))]


def batched_decode_equals_each_session_alone(make: Callable) -> None:
    prompts = ["hi", "tell me a long story about " + "dragons " * 10, "a medium sized message " * 3]
    params = GenerationParams(max_tokens=20, ignore_eos=True)
    alone = []
    for i, text in enumerate(prompts):
        engine = make()
        sid = engine.open_session(system_prompt=f"system {i}")
        alone.append([o.token_id for o in engine.chat(sid, text, params)])
    engine = make()
    sids = [engine.open_session(system_prompt=f"system {i}") for i in range(len(prompts))]
    for sid, text in zip(sids, prompts):
        engine.add_message(sid, text, params)
    together, widest = {sid: [] for sid in sids}, 0
    while engine.has_work():
        outs = engine.step()
        widest = max(widest, len(outs))
        for out in outs:
            together[out.session_id].append(out.token_id)
    assert widest == 3
    assert [together[sid] for sid in sids] == alone


def park_and_unpark_are_exact(make: Callable) -> None:
    engine, reference = make(slots=2), make(slots=2)
    sid, rid = engine.open_session(), reference.open_session()
    turn(engine, sid, "hello there", max_tokens=40, ignore_eos=True)  # past sinks + window: evicting
    turn(reference, rid, "hello there", max_tokens=40, ignore_eos=True)
    engine.park(sid)
    assert engine.session_view(sid).parked and engine.free_slots == 2
    other = engine.open_session()  # the freed slot is reused meanwhile
    turn(engine, other, "someone else", max_tokens=5)
    a = turn(engine, sid, "continue", max_tokens=12, ignore_eos=True)
    assert a == turn(reference, rid, "continue", max_tokens=12, ignore_eos=True)


def rebuild_from_transcript(make: Callable, evicted_entries: int) -> None:
    """Without eviction a rebuilt session is the same cache (exact); with eviction the rebuild ingests the
    transcript's sinks + last window ids and holds as many entries as the live session (`evicted_entries`: the
    default engine's sinks + window)."""
    engine = make(window=200, slots=1)
    sid = engine.open_session()
    transcript = []
    for i in range(3):
        outputs = list(engine.chat(sid, f"turn {i}", GenerationParams(max_tokens=10, ignore_eos=True)))
        transcript += outputs[-1].turn_tokens
    twin = make(window=200, slots=1)
    twin.import_session("copy", transcript)
    assert turn(engine, sid, "again", max_tokens=10, ignore_eos=True) == turn(twin, "copy", "again", max_tokens=10,
                                                                               ignore_eos=True)
    small = make(slots=1)
    small.import_session("evicted", transcript)
    assert len(transcript) > evicted_entries
    assert len(turn(small, "evicted", "again", max_tokens=10, ignore_eos=True)) == 10
    view = small.session_view("evicted")
    assert view.cache_entries == evicted_entries and view.tokens_seen == engine.session_view(sid).tokens_seen
