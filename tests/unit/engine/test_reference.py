"""Numerics against references: HF transformers' forward before eviction, and a plain StreamingLLM
re-implementation (cache positions) after eviction."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.weights import prepare_bundled_model

from sinkserve.engine.testing import random_ids

MAX_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_max_diff():
    yield
    print("\nmax |logit diff| vs HF (fp32, before eviction):", {k: f"{v:.2e}" for k, v in MAX_DIFF.items()})


# Sinks 0 exercises the fused causal path taken by a chunk over an empty ring (all of it at chunk 200);
# chunk 1 is the decode path (one query per step, its key written before attention).
@pytest.mark.parametrize("sinks,chunk", [(4, 48), (0, 48), (0, 200), (4, 1)])
@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_neox"])
def test_logits_equal_hf_before_eviction(request, arch_fixture, sinks, chunk):
    path = request.getfixturevalue(arch_fixture)
    engine = load_engine(
        EngineConfig(model=str(path), sinks=sinks, window=256, slots=1, device="cpu", prefill_chunk=chunk, dtype="float32",
                     weights="dense")
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(200, seed=1)
    ours = engine.stream_logits(ids, chunk=chunk)  # chunks of different sizes, last one partial
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    MAX_DIFF[arch_fixture] = max(MAX_DIFF.get(arch_fixture, 0.0), (ours - ref).abs().max().item())
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


@pytest.mark.slow
def test_bundled_model_equals_hf_before_eviction():
    checkpoint = prepare_bundled_model()
    engine = load_engine(EngineConfig(sinks=4, window=508, slots=1, device="cpu", prefill_chunk=128, dtype="float32", weights="dense"))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = engine.tokenizer("Attention sinks keep streaming language models stable. " * 30)["input_ids"][:300]
    ours = engine.stream_logits(ids, chunk=128)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


def _rope(x, positions, theta):
    # Rotate-half RoPE written out plainly: x [T, H, D], positions [T].
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.outer(positions.double(), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None, :]
    half = dim // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def reference_streaming_llama(hf_model, ids, sinks, window, cache_positions=True):
    """Token-by-token StreamingLLM over an HF Llama's weights: keys cached before rotation, sinks + the
    last `window` entries kept (the current token included), RoPE applied at attention time with
    positions inside the cache (or, for the contrast, the tokens' original text positions)."""
    cfg = hf_model.config
    inner = hf_model.model
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_heads
    theta = cfg.rope_parameters["rope_theta"]
    caches = [dict(k=[], v=[], pos=[]) for _ in inner.layers]
    all_logits = []
    for t, token in enumerate(ids):
        x = inner.embed_tokens(torch.tensor([token]))
        for layer, cache in zip(inner.layers, caches):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            q = attn.q_proj(h).view(1, n_heads, head_dim)
            k = attn.k_proj(h).view(1, n_kv, head_dim)
            v = attn.v_proj(h).view(1, n_kv, head_dim)
            cache["k"].append(k)
            cache["v"].append(v)
            cache["pos"].append(t)
            if len(cache["k"]) > sinks + window:  # evict the oldest non-sink entry
                for key in ("k", "v", "pos"):
                    del cache[key][sinks]
            keys, values = torch.cat(cache["k"]), torch.cat(cache["v"])
            n = keys.shape[0]
            positions = torch.arange(n) if cache_positions else torch.tensor(cache["pos"])
            q_rot = _rope(q, positions[-1:], theta)
            k_rot = _rope(keys, positions, theta)
            group = n_heads // n_kv
            k_rot = k_rot.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q_rot, k_rot) / head_dim**0.5
            out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(1, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        all_logits.append(hf_model.lm_head(inner.norm(x)))
    return torch.cat(all_logits)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [10, 1])  # chunked prefill, and the decode path
def test_after_eviction_positions_are_inside_the_cache(tiny_llama, chunk):
    sinks, window = 4, 24
    ids = random_ids(120, seed=2)  # ~4x the window: the ring wraps several times
    engine = load_engine(
        EngineConfig(model=str(tiny_llama), sinks=sinks, window=window, slots=1, device="cpu", prefill_chunk=10,
                     dtype="float32", weights="dense")
    )
    ours = engine.stream_logits(ids, chunk=chunk)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    cache_pos = reference_streaming_llama(hf, ids, sinks, window, cache_positions=True)
    text_pos = reference_streaming_llama(hf, ids, sinks, window, cache_positions=False)
    assert torch.allclose(ours, cache_pos, atol=1e-4, rtol=0), (ours - cache_pos).abs().max()
    # Before eviction both rules agree; after it they must differ, and we follow the paper's.
    evicting = slice(sinks + window, None)
    assert (ours[evicting] - text_pos[evicting]).abs().max() > 1e-2
    assert torch.allclose(cache_pos[: sinks + window], text_pos[: sinks + window], atol=1e-4)


def test_chunked_prefill_equals_token_by_token(make_engine):
    ids = random_ids(150, seed=3)
    by_token = make_engine().stream_logits(ids, chunk=1)
    for chunk in (7, 16):
        assert torch.allclose(make_engine().stream_logits(ids, chunk=chunk), by_token, atol=1e-4, rtol=0)


def test_window_frame_rebase_is_exact(make_engine):
    """Many wraps of the ring (several rebases of the window frame) keep matching token-by-token."""
    ids = random_ids(400, seed=4)
    engine = make_engine(window=16, prefill_chunk=16)
    assert engine.runner.rope.positions < 400  # rebasing must happen in this run
    a = engine.stream_logits(ids, chunk=16)
    b = make_engine(window=16, prefill_chunk=16).stream_logits(ids, chunk=1)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)
