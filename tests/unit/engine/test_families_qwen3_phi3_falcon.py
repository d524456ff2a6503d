"""Qwen3, Phi-3 (partial rotary + LongRoPE) and Falcon (multi-query / new decoder architecture / sequential)
against HF transformers' own forward before eviction and a plain StreamingLLM reference after it; batching,
parking, rebuild and int4 on each."""

import json
import shutil
from functools import partial

import pytest
import torch
import transformers

from sinkserve.engine.quant import dequantize, quantize_q4_1, quantize_q8_0_split
from sinkserve.engine.testing import TOKENIZER_FILES, random_ids
from sinkserve.engine.weights import prepare_bundled_model
from sinkserve.errors import UnsupportedModel

import family_checks
from family_checks import engine_for, hf_model

VOCAB = 49152  # the bundled tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
              eos_token_id=2)
VARIANTS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        intermediate_size=128, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        intermediate_size=128, num_key_value_heads=2, max_position_embeddings=1024,
        original_max_position_embeddings=256, partial_rotary_factor=0.5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7],
                      "long_factor": [1.5, 2.5, 4.0, 8.0]}, pad_token_id=0)),
    "falcon_7b": ("FalconConfig", "FalconForCausalLM", dict(  # classic: multi-query, parallel, one layernorm
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, ffn_hidden_size=128)),
    "falcon_new": ("FalconConfig", "FalconForCausalLM", dict(  # 40B/180B: grouped kv, ln_attn + ln_mlp
        new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=True, ffn_hidden_size=128)),
    "falcon_seq": ("FalconConfig", "FalconForCausalLM", dict(  # per-head interleaved qkv, sequential block
        multi_query=False, parallel_attn=False, new_decoder_architecture=False, bias=True, ffn_hidden_size=128)),
}
MAX_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    source = prepare_bundled_model(progress=False)
    made = {}
    for name, (config_cls, model_cls, extra) in VARIANTS.items():
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra))
        with torch.no_grad():  # random init is small: scale up so attention is far from uniform
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
                elif name != "qwen3":
                    p.add_(0.1 * torch.randn_like(p))  # biases and norm weights away from 0 / 1
        model.save_pretrained(out, safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copy(source / file, out / file)
        made[name] = out
    return made


@pytest.fixture(scope="module", autouse=True)
def report_max_diff():
    yield
    print("\nmax |logit diff| vs HF (fp32, before eviction):", {k: f"{v:.2e}" for k, v in MAX_DIFF.items()})


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_hf_before_eviction(checkpoints, variant):
    ids = random_ids(100, seed=1)
    ref = hf_model(checkpoints[variant])(torch.tensor([ids])).logits[0]
    for chunk in (16, 1):  # chunked prefill, then the decode path token by token
        ours = engine_for(checkpoints[variant], window=200, slots=1).stream_logits(ids, chunk=chunk)
        diff = (ours - ref).abs().max().item()
        MAX_DIFF[variant] = max(MAX_DIFF.get(variant, 0.0), diff)
        assert diff <= 1e-4, (variant, chunk, diff)
    assert ref.abs().max() > 1.0  # logits far from zero: the comparison means something


# ---- a plain StreamingLLM reference over the HF modules: keys cached before rotation, sinks + the last
# `window` entries kept (the current token included), RoPE at attention time by position inside the cache.


def _rotate(x, positions, inv_freq, scaling):
    rot = 2 * inv_freq.shape[0]
    ang = torch.outer(positions.double(), inv_freq.double())
    cos = (torch.cat([ang.cos(), ang.cos()], -1) * scaling).float()[:, None, :]
    sin = (torch.cat([ang.sin(), ang.sin()], -1) * scaling).float()[:, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    turned = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    return torch.cat([x_rot * cos + turned * sin, x_pass], -1)


class PlainCache:
    def __init__(self, sinks, window, rotary):
        self.sinks, self.window = sinks, window
        self.inv_freq, self.scaling = rotary.inv_freq, rotary.attention_scaling
        self.k, self.v = [], []

    def attend(self, q, k, v):  # q [1, Hq, D], k/v [1, Hkv, D] -> [1, Hq * D]
        self.k.append(k)
        self.v.append(v)
        if len(self.k) > self.sinks + self.window:
            del self.k[self.sinks], self.v[self.sinks]
        keys, values = torch.cat(self.k), torch.cat(self.v)
        n, group = keys.shape[0], q.shape[1] // keys.shape[1]
        positions = torch.arange(n)
        q_rot = _rotate(q, positions[-1:], self.inv_freq, self.scaling)
        k_rot = _rotate(keys, positions, self.inv_freq, self.scaling).repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_rot, k_rot) / q.shape[-1] ** 0.5
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(1, -1)


def _llama_like_step(hf, x, caches, qkv):
    for layer, cache in zip(hf.model.layers, caches):
        attn = layer.self_attn
        q, k, v = qkv(attn, layer.input_layernorm(x))
        x = x + attn.o_proj(cache.attend(q, k, v))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(hf.model.norm(x))


def _qwen3_qkv(attn, h):
    d = attn.head_dim
    q = attn.q_norm(attn.q_proj(h).view(1, -1, d))
    k = attn.k_norm(attn.k_proj(h).view(1, -1, d))
    return q, k, attn.v_proj(h).view(1, -1, d)


def _phi3_qkv(attn, h):
    d, cfg = attn.head_dim, attn.config
    q_size, kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    q, k, v = attn.qkv_proj(h).split([q_size, kv_size, kv_size], dim=-1)
    return q.view(1, -1, d), k.view(1, -1, d), v.view(1, -1, d)


def _falcon_step(hf, x, caches):
    cfg = hf.config
    for layer, cache in zip(hf.transformer.h, caches):
        attn = layer.self_attention
        if cfg.new_decoder_architecture:
            h_attn, h_mlp = layer.ln_attn(x), layer.ln_mlp(x)
        else:
            h_attn = layer.input_layernorm(x)
        out = attn.dense(cache.attend(*_falcon_split(attn, h_attn)))
        if not cfg.parallel_attn:
            x = x + out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            continue
        if not cfg.new_decoder_architecture:
            h_mlp = h_attn
        x = x + out + layer.mlp(h_mlp)
    return hf.lm_head(hf.transformer.ln_f(x))


def _falcon_split(attn, h):
    """Falcon's fused qkv in its three layouts (as FalconAttention lays it out): h [1, hidden] -> q [1, Hq, D],
    k/v [1, Hkv, D]."""
    fused = attn.query_key_value(h).view(*h.shape[:-1], -1, attn.head_dim)
    if attn.new_decoder_architecture:  # per kv group: its queries, then its key and its value
        grouped = fused.view(*h.shape[:-1], attn.num_kv_heads, -1, attn.head_dim)
        return grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
    if attn.multi_query:  # all queries, then the one key and the one value
        return fused.split([attn.num_heads, 1, 1], dim=-2)
    return fused.unflatten(-2, (attn.num_heads, 3)).unbind(-2)  # query, key, value interleaved per head


def plain_reference(hf, variant, ids, sinks, window):
    inner = hf.transformer if variant.startswith("falcon") else hf.model
    layers = inner.h if variant.startswith("falcon") else inner.layers
    caches = [PlainCache(sinks, window, inner.rotary_emb) for _ in layers]
    embed = inner.word_embeddings if variant.startswith("falcon") else inner.embed_tokens
    logits = []
    for token in ids:
        x = embed(torch.tensor([token]))
        if variant.startswith("falcon"):
            logits.append(_falcon_step(hf, x, caches))
        else:
            logits.append(_llama_like_step(hf, x, caches, _qwen3_qkv if variant == "qwen3" else _phi3_qkv))
    return torch.cat(logits)


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_after_eviction_positions_are_inside_the_cache(checkpoints, variant):
    sinks, window = 4, 24
    ids = random_ids(90, seed=2)  # ~3x the window: the ring wraps
    hf = hf_model(checkpoints[variant])
    ref = plain_reference(hf, variant, ids, sinks, window)
    # the reference itself agrees with HF while nothing is evicted
    full = hf(torch.tensor([ids[: sinks + window]])).logits[0]
    assert torch.allclose(ref[: sinks + window], full, atol=1e-4, rtol=0)
    for chunk in (10, 1):
        ours = engine_for(checkpoints[variant], sinks=sinks, window=window, slots=1, prefill_chunk=10).stream_logits(
            ids, chunk=chunk
        )
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (variant, chunk, (ours - ref).abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_decode_equals_each_session_alone(checkpoints, variant):
    family_checks.batched_decode_equals_each_session_alone(partial(engine_for, checkpoints[variant]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_park_and_unpark_are_exact(checkpoints, variant):
    family_checks.park_and_unpark_are_exact(partial(engine_for, checkpoints[variant]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rebuild_from_transcript(checkpoints, variant):
    family_checks.rebuild_from_transcript(partial(engine_for, checkpoints[variant]), evicted_entries=36)


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int4_engine_matches_hf_on_the_quantized_weights(checkpoints, variant):
    """As tests/unit/engine/test_quant.py: HF's fp32 forward with its linear layers replaced by their Q4_1
    values (the head by its Q8_0 values) is the reference for the bfloat16 int4 engine. Falcon's reordered qkv
    rows and Phi-3's folded LongRoPE attention factor quantize to the same values (per-row blocks)."""
    hf = hf_model(checkpoints[variant])
    for module in hf.modules():
        if isinstance(module, torch.nn.Linear) and module is not hf.lm_head:
            module.weight.copy_(dequantize(*quantize_q4_1(module.weight)))
    head = hf.lm_head.weight
    halves = dequantize(*quantize_q8_0_split(head))
    head.copy_(halves[:, : head.shape[1]] + halves[:, head.shape[1] :])
    ids = random_ids(60, seed=4)
    ref = hf(torch.tensor([ids])).logits[0]
    for chunk in (1, 16):  # the packed kernel (decode rows), the de-quantized GEMM (prefill)
        engine = engine_for(checkpoints[variant], window=128, slots=1, dtype="bfloat16", weights="int4",
                            packed_max_rows=4)
        ours = engine.stream_logits(ids, chunk=chunk).float()
        assert (ours - ref).abs().max() <= 0.03 * ref.abs().max(), (chunk, (ours - ref).abs().max())
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9  # bfloat16 near-ties


def test_longrope_cache_is_bounded_by_the_original_context(checkpoints):
    """Phi-3 LongRoPE: cache positions stay within original_max_position_embeddings, where HF uses
    short_factor; a cache past it is refused rather than run with the wrong factor."""
    from sinkserve.errors import InvalidArgument

    engine = engine_for(checkpoints["phi3"], sinks=4, window=252, slots=1)
    assert engine.runner.args.max_context == 256
    with pytest.raises(InvalidArgument, match="context length 256"):
        engine_for(checkpoints["phi3"], sinks=4, window=253, slots=1)


def test_unsupported_architecture_names_the_supported_ones(checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen3"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"], config["model_type"] = ["BertModel"], "bert"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM.*Qwen3ForCausalLM.*Phi3ForCausalLM.*FalconForCausalLM"):
        engine_for(bad)
    alibi = tmp_path / "alibi"
    shutil.copytree(checkpoints["falcon_7b"], alibi)
    config = json.loads((alibi / "config.json").read_text())
    config["alibi"] = True
    (alibi / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="alibi"):
        engine_for(alibi)
