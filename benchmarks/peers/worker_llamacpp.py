"""llama.cpp's side of the peers benchmark (llama-cpp-python, built from source for this CPU by `make peers-setup`).

It reads the bundled Q4_1 GGUF itself: the same 4-bit blocks sinkserve's int4 path reads. Driven through the C API
(llama_batch / llama_decode / the greedy sampler), the way llama.cpp's own `batched` example runs parallel
sequences: one sequence per session, each with its own KV cells (kv_unified off).
"""

from __future__ import annotations

import sys
import time

import llama_cpp as L

from benchmarks.peers.workload import Clock, Spec, emit, log, median

SYSTEM = "llama.cpp"
N_BATCH, N_UBATCH = 2048, 512  # llama.cpp's own defaults (llama-server, llama-cli)


class Context:
    def __init__(self, model, n_ctx: int, sequences: int, threads: int):
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, N_BATCH, N_UBATCH
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # separate cells per sequence: the faster choice when prompts share nothing
        params.no_perf = True
        self.ctx = L.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_ctx = n_ctx
        self.batch = L.llama_batch_init(N_BATCH, 0, 1)
        self.sampler = L.llama_sampler_init_greedy()

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, position, sequence, wants_logits), at most N_BATCH; returns the greedy next token of each
        item that wanted logits, in order."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}" + (" (no room left in the KV cache)" if rc == 1 else ""))
        return [L.llama_sampler_sample(self.sampler, self.ctx, i) for i, item in enumerate(items) if item[3]]

    def prefill(self, prompts: dict[int, list[int]]) -> dict[int, int]:
        """Every sequence's prompt, packed N_BATCH tokens per llama_decode; returns each sequence's first token."""
        items = [(tok, pos, seq, pos == len(p) - 1) for seq, p in prompts.items() for pos, tok in enumerate(p)]
        first: dict[int, int] = {}
        for start in range(0, len(items), N_BATCH):
            chunk = items[start: start + N_BATCH]
            for item, token in zip([it for it in chunk if it[3]], self.decode(chunk)):
                first[item[2]] = token
        return first

    def close(self) -> None:
        L.llama_sampler_free(self.sampler)
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)


def decode_run(ctx: Context, prompts: dict[int, list[int]], decode_tokens: int) -> dict:
    ctx.clear()
    with Clock() as prefill:
        tokens = ctx.prefill(prompts)
    positions = {seq: len(p) for seq, p in prompts.items()}
    step_s = []
    for _ in range(decode_tokens):
        with Clock() as step:
            seqs = sorted(tokens)
            nxt = ctx.decode([(tokens[s], positions[s], s, True) for s in seqs])
        step_s.append(step.seconds)
        for s, t in zip(seqs, nxt):
            tokens[s] = t
            positions[s] += 1
    return {"prefill_s": prefill.seconds, "step_s": step_s, "decode_tokens": decode_tokens * len(prompts)}


def main(spec_path: str) -> int:
    spec = Spec.load(spec_path)
    L.llama_backend_init()
    with Clock() as load:
        params = L.llama_model_default_params()
        model = L.llama_model_load_from_file(spec.gguf.encode(), params)
        if not model:
            raise RuntimeError(f"could not load {spec.gguf}")
        ctx = Context(model, spec.context, 1, spec.threads)
    system_info = L.llama_print_system_info().decode(errors="replace").strip()
    result: dict = {"system": SYSTEM, "version": L.__version__, "load_s": load.seconds, "single": {},
                    "concurrent": {},
                    "settings": {"weights": "bundled GGUF (Q4_1 blocks, Q8_0 output)", "n_ctx": spec.context,
                                 "n_batch": N_BATCH, "n_ubatch": N_UBATCH, "threads": spec.threads,
                                 "system_info": system_info}}
    message = spec.message_ids
    for cache, transcript in spec.single.items():
        prompt = transcript + message
        run = decode_run(ctx, {0: prompt}, spec.decode_tokens)
        result["single"][cache] = {"prompt_tokens": len(prompt), "prefill_s": run["prefill_s"],
                                   "prefill_tokens_per_s": len(prompt) / run["prefill_s"],
                                   "decode_ms_per_token": median(run["step_s"]) * 1e3}
        log(SYSTEM, f"one session, cache {cache}: {result['single'][cache]['decode_ms_per_token']:.1f} ms/token")
    ttft_prompt = spec.ttft_prompt + message
    run = decode_run(ctx, {0: ttft_prompt}, 0)
    result["ttft"] = {"prompt_tokens": len(ttft_prompt), "ttft_s": run["prefill_s"]}
    overflow = spec.overflow_prompt + message
    # The C API aborts the process on a batch past n_ctx; the library's own Llama class checks first: ask it.
    llm = L.Llama(model_path=spec.gguf, n_ctx=spec.context, n_threads=spec.threads, verbose=False)
    try:
        llm.create_completion(overflow, max_tokens=spec.decode_tokens, temperature=0.0)
        result["overflow"] = {"prompt_tokens": len(overflow), "outcome": "served", "detail": "no error"}
    except ValueError as exc:
        result["overflow"] = {
            "prompt_tokens": len(overflow), "outcome": "failed",
            "detail": f"llama_cpp.Llama raised ValueError: {exc}; the library has no eviction of its own: llama-server's context "
                      "shift, which drops half the context and re-positions the rest, is not in the Python API"}
    llm.close()
    ctx.close()
    for sessions in spec.concurrency:
        ctx = Context(model, sessions * 256, sessions, spec.threads)
        prompts = {i: p + message for i, p in enumerate(spec.concurrent_prompts[:sessions])}
        run = decode_run(ctx, prompts, spec.decode_tokens)
        prompt_tokens = sum(len(p) for p in prompts.values())
        result["concurrent"][str(sessions)] = {
            "sessions": sessions, "tokens_per_s": run["decode_tokens"] / sum(run["step_s"]),
            "prefill_tokens_per_s": prompt_tokens / run["prefill_s"], "prompt_tokens": prompt_tokens}
        log(SYSTEM, f"{sessions} sessions: {result['concurrent'][str(sessions)]['tokens_per_s']:.0f} tok/s")
        ctx.close()
    L.llama_model_free(model)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
