"""What a user would run instead: Hugging Face transformers `generate` (dense KV cache) on the same checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import median


class _StepClock:
    """A logits processor that stamps the time of every generation step.

    generate() calls it once per new token, right after that step's forward pass, so the gap between two
    stamps is one decode step (forward + sampling). The first stamp follows the prefill.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        return scores


class HFBaseline:
    def __init__(self, checkpoint: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.checkpoint = checkpoint
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", "unknown")

    @torch.inference_mode()
    def decode_step_times(self, input_ids: torch.Tensor, new_tokens: int) -> dict:
        """Greedy-generate `new_tokens` after a prompt (batch = rows of input_ids); per-step decode seconds."""
        from transformers import LogitsProcessorList

        clock = _StepClock()
        start = time.perf_counter()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # never stop early on EOS: every step is timed
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=pad_id,
        )
        steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        cpu_steps = [b - a for a, b in zip(clock.cpu_stamps, clock.cpu_stamps[1:])]
        return {
            "prefill_s": clock.stamps[0] - start if clock.stamps else float("nan"),
            "step_s": steps,
            "median_step_s": median(steps),
            "median_cpu_s": median(cpu_steps),
            "batch": int(input_ids.shape[0]),
            "prompt_tokens": int(input_ids.shape[1]),
        }

    def chat_prompt_ids(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return torch.as_tensor(ids).reshape(1, -1)

    def close(self) -> None:
        del self.model
