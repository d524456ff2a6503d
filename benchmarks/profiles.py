"""torch.profiler summaries of the two decode shapes the speed targets depend on."""

from __future__ import annotations

from benchmarks.common import Plan, log
from benchmarks.engine_runs import Geometry, load, profile_steps
from benchmarks.speed import PROMPTS, _text_ids


def _decoding_engine(model: str, cache: int, sessions: int, text: str, steps: int, dtype: str, weights: str):
    from sinkserve.protocol import GenerationParams

    engine = load(model, Geometry("streaming", cache), slots=sessions, prefill_chunk=cache, dtype=dtype,
                  max_step_tokens=max(2048, cache + 256), weights=weights)
    params = GenerationParams(max_tokens=steps * 4 + 64, ignore_eos=True)
    if sessions == 1:
        ids = _text_ids(engine.tokenizer, text, cache + 128)
        engine.import_session("profiled", ids)
        engine.add_message("profiled", "Continue.", params)
    else:
        for i in range(sessions):
            sid = engine.open_session()
            engine.add_message(sid, PROMPTS[i % len(PROMPTS)], params)
    # until every session is decoding: the profiled steps are pure decode
    for _ in range(64):
        outs = engine.step()
        if len([o for o in outs if o.token_id is not None]) == sessions:
            break
    for _ in range(2):  # warm up
        engine.step()
    return engine


def run_profiles(model: str, text: str, plan: Plan) -> dict:
    profiles = {}
    largest = max(plan.latency_cache_sizes)
    shapes = [
        ("decode_b1", f"one session decoding, streaming cache {largest}", largest, 1),
        ("decode_batched", f"{max(plan.throughput_sessions)} sessions decoding, streaming cache "
         f"{plan.throughput_cache}", plan.throughput_cache, max(plan.throughput_sessions)),
    ]
    for key, title, cache, sessions in shapes:
        log(f"profiling {title}")
        engine = _decoding_engine(model, cache, sessions, text, plan.profile_steps, plan.speed_dtype,
                                  plan.speed_weights)
        result = profile_steps(engine, plan.profile_steps)
        result["title"] = title
        result["sessions"] = sessions
        result["cache"] = cache
        profiles[key] = result
        del engine
    return profiles
