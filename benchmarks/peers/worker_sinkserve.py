"""sinkserve's side of the peers benchmark: its own engine step loop on the spec's token ids."""

from __future__ import annotations

import sys
import time

from benchmarks.peers.workload import Clock, Spec, emit, log, median

SYSTEM = "sinkserve"


def _engine(spec: Spec, slots: int, cache: int):
    from sinkserve.config import EngineConfig
    from sinkserve.engine import load_engine

    fields = dict(model=spec.checkpoint, device="cpu", slots=slots, sinks=4, window=cache - 4,
                  num_threads=spec.threads, seed=0)
    fields.update(spec.sinkserve)
    return load_engine(EngineConfig(**fields))


def _start(engine, sid: str, transcript: list[int], message: str, max_tokens: int) -> None:
    """The transcript as the session's history (nothing computed yet), then the message: the next steps ingest
    transcript + the message's ids, which is exactly what the peers are given."""
    from sinkserve.protocol import GenerationParams

    engine.import_session(sid, transcript)
    engine.add_message(sid, message, GenerationParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))


def _decode_run(engine, prompts: dict[str, list[int]], message: str, decode_tokens: int) -> dict:
    """Prefill every prompt, then time `decode_tokens` steps once every session has its first token."""
    for sid, prompt in prompts.items():
        _start(engine, sid, prompt, message, decode_tokens + 1)
    first: dict[str, float] = {}
    start = time.perf_counter()
    while len(first) < len(prompts):
        for out in engine.step():
            if out.token_id is not None and out.session_id not in first:
                first[out.session_id] = time.perf_counter() - start
    step_s, produced = [], 0
    while engine.has_work():
        with Clock() as clock:
            outs = engine.step()
        step_s.append(clock.seconds)
        produced += sum(1 for o in outs if o.token_id is not None)
    for sid in prompts:
        engine.close_session(sid)
    return {"prefill_s": max(first.values()), "first_token_s": first, "step_s": step_s,
            "decode_tokens": produced, "decode_s": sum(step_s)}


def main(spec_path: str) -> int:
    import torch

    spec = Spec.load(spec_path)
    torch.set_num_threads(spec.threads)
    import sinkserve

    result: dict = {"system": SYSTEM, "version": getattr(sinkserve, "__version__", "dev"), "single": {},
                    "concurrent": {}}
    with Clock() as load:
        engine = _engine(spec, slots=1, cache=spec.context)
    result["load_s"] = load.seconds
    result["settings"] = {**engine.paths.as_dict(), "sinks": 4, "window": spec.context - 4}
    for cache, prompt in spec.single.items():
        run = _decode_run(engine, {f"single-{cache}": prompt}, spec.message, spec.decode_tokens)
        result["single"][cache] = {"prompt_tokens": len(prompt) + len(spec.message_ids), "prefill_s": run["prefill_s"],
                                   "prefill_tokens_per_s": (len(prompt) + len(spec.message_ids)) / run["prefill_s"],
                                   "decode_ms_per_token": median(run["step_s"]) * 1e3}
        log(SYSTEM, f"one session, cache {cache}: {result['single'][cache]['decode_ms_per_token']:.1f} ms/token")
    run = _decode_run(engine, {"ttft": spec.ttft_prompt}, spec.message, 1)
    result["ttft"] = {"prompt_tokens": len(spec.ttft_prompt) + len(spec.message_ids), "ttft_s": run["prefill_s"]}
    # past the peers' context: sinkserve evicts and keeps going
    run = _decode_run(engine, {"overflow": spec.overflow_prompt}, spec.message, spec.decode_tokens)
    result["overflow"] = {"prompt_tokens": len(spec.overflow_prompt) + len(spec.message_ids), "outcome": "served",
                          "detail": f"kept 4 sinks + the last {spec.context - 4} tokens (evicted the rest), "
                                    f"decoded at {median(run['step_s']) * 1e3:.1f} ms/token"}
    engine.close()
    del engine
    for sessions in spec.concurrency:
        engine = _engine(spec, slots=sessions, cache=256)
        prompts = {f"c{sessions}-{i}": p for i, p in enumerate(spec.concurrent_prompts[:sessions])}
        run = _decode_run(engine, prompts, spec.message, spec.decode_tokens)
        prompt_tokens = sum(len(p) + len(spec.message_ids) for p in prompts.values())
        result["concurrent"][str(sessions)] = {
            "sessions": sessions, "tokens_per_s": run["decode_tokens"] / run["decode_s"],
            "prefill_tokens_per_s": prompt_tokens / run["prefill_s"], "prompt_tokens": prompt_tokens}
        log(SYSTEM, f"{sessions} sessions: {result['concurrent'][str(sessions)]['tokens_per_s']:.0f} tok/s")
        engine.close()
        del engine
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
