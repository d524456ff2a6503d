"""Tiny random-weight checkpoints for tests and load runs that need no real language."""

from __future__ import annotations

import shutil
from pathlib import Path

from sinkserve.engine.weights import prepare_bundled_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_tiny_checkpoint(directory: str | Path, arch: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0,
                         heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a random-weight HF checkpoint (config.json + model.safetensors) with the bundled model's
    tokenizer and chat template. arch: 'llama' (GQA, tied embeddings; `heads` query and `kv_heads` KV heads) or
    'gpt_neox' (`heads` heads, partial rotary, parallel residual). Idempotent for the same directory."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    out = Path(directory)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = 49152  # the bundled tokenizer's
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192, rope_theta=10000.0,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
            bos_token_id=1, eos_token_id=2,
        )
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use 'llama' or 'gpt_neox'")
    # Random init is small; scale embeddings up so attention patterns are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(out, safe_serialization=True)
    source = prepare_bundled_model(progress=False)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    """Deterministic random token ids."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=generator).tolist()
