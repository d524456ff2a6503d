"""MPT (ALiBi) against HF transformers' own forward before eviction and a plain StreamingLLM reference after it:
the ALiBi bias comes from positions inside the cache (paper §3.2), and a second reference that takes distances
in the original text gives different logits. Batching, parking, rebuild, int4, the sink-less policies, tensor
parallelism's refusal and the refused config options.

HF's MptForCausalLM ignores attn_config.alibi_bias_max (always 8) and logit_scale; the engine follows the
config as MosaicML's code does, so for those variants the reference is HF's modules with the config's slopes
(from HF's own build_mpt_alibi_tensor) and HF's logits times the scale."""

import json
import shutil
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, MptConfig, MptForCausalLM
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.models import mpt
from sinkserve.engine.quant import dequantize, quantize_q4_1, quantize_q8_0_split
from sinkserve.engine.testing import TOKENIZER_FILES, random_ids
from sinkserve.engine.weights import prepare_bundled_model
from sinkserve.errors import UnsupportedModel

import family_checks
from family_checks import engine_for, hf_model

VOCAB = 49152  # the bundled tokenizer's
COMMON = dict(vocab_size=VOCAB, n_layers=2, max_seq_len=512, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "mpt": dict(d_model=64, n_heads=4),  # MPT-7B's options: tied, alibi_bias_max 8, no clipping
    # 6 heads: slopes of the next power of two, interleaved; clip_qkv, softmax_scale, untied head, logit_scale
    "mpt_clip": dict(d_model=96, n_heads=6, tie_word_embeddings=False, logit_scale=1.5,
                     attn_config=dict(clip_qkv=0.5, softmax_scale=0.4)),
    "mpt_bias4": dict(d_model=64, n_heads=8, attn_config=dict(alibi_bias_max=4)),  # HF's forward ignores it
}
HF_FORWARD = {"mpt", "mpt_clip"}  # variants whose slopes HF's forward uses (alibi_bias_max 8)
MAX_DIFF: dict[str, float] = {}
MAX_DIFF_EVICTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    source = prepare_bundled_model(progress=False)
    made = {}
    for name, extra in VARIANTS.items():
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model = MptForCausalLM(MptConfig(**COMMON, **extra))
        with torch.no_grad():  # random init is small: scale up so attention is far from uniform
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
                else:
                    p.add_(0.1 * torch.randn_like(p))  # norm weights away from 1
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
    print("max |logit diff| vs the cache-position reference (after eviction):",
          {k: f"{v:.2e}" for k, v in MAX_DIFF_EVICTED.items()})


# ---- a plain StreamingLLM reference over the HF modules, token by token: sinks + the last `window` entries
# kept (the current token included). rule="cache": ALiBi by positions inside the cache, 0..n-1 (the paper);
# rule="text": by the tokens' positions in the original text (what the paper says not to do).


def _slopes(hf):
    bias = build_mpt_alibi_tensor(hf.config.n_heads, 2, hf.config.attn_config.alibi_bias_max)  # [H, 1, 2]
    return -bias[:, 0, 0]  # the key one position back: -slope


class PlainCache:
    def __init__(self, sinks, window, slopes, rule):
        self.sinks, self.window, self.slopes, self.rule = sinks, window, slopes, rule
        self.k, self.v, self.text = [], [], []

    def attend(self, q, k, v, t, scale):  # q/k/v [H, D] -> [1, H * D]
        self.k.append(k)
        self.v.append(v)
        self.text.append(t)
        if len(self.k) > self.sinks + self.window:
            del self.k[self.sinks], self.v[self.sinks], self.text[self.sinks]
        keys, values = torch.stack(self.k), torch.stack(self.v)  # [n, H, D]
        positions = torch.arange(len(self.k)) if self.rule == "cache" else torch.tensor(self.text)
        bias = self.slopes[:, None] * (positions - positions[-1]).float()[None, :]  # [H, n]
        scores = torch.einsum("hd,khd->hk", q, keys) * scale + bias
        return torch.einsum("hk,khd->hd", scores.softmax(-1), values).reshape(1, -1)


def plain_reference(hf, ids, sinks, window, rule="cache"):
    cfg, inner = hf.config, hf.transformer
    heads, head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
    caches = [PlainCache(sinks, window, _slopes(hf), rule) for _ in inner.blocks]
    logits = []
    for t, token in enumerate(ids):
        x = inner.wte(torch.tensor([token]))
        for block, cache in zip(inner.blocks, caches):
            attn = block.attn
            qkv = attn.Wqkv(block.norm_1(x))
            if attn.clip_qkv:
                qkv = qkv.clamp(-attn.clip_qkv, attn.clip_qkv)
            q, k, v = (part.reshape(heads, head_dim) for part in qkv.chunk(3, dim=-1))
            x = x + attn.out_proj(cache.attend(q, k, v, t, attn.softmax_scale))
            x = block.ffn(block.norm_2(x), x)  # HF's MLP adds the residual itself
        logits.append(hf.lm_head(inner.norm_f(x)))
    return torch.cat(logits) * (cfg.logit_scale or 1.0)


def reference_without_eviction(hf, variant, ids):
    """HF's forward (times logit_scale, which it ignores) where its slopes are the config's; otherwise the plain
    reference with a cache holding everything."""
    if variant in HF_FORWARD:
        return hf(torch.tensor([ids])).logits[0] * (hf.config.logit_scale or 1.0)
    return plain_reference(hf, ids, sinks=4, window=len(ids))


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_hf_before_eviction(checkpoints, variant):
    ids = random_ids(100, seed=1)
    hf = hf_model(checkpoints[variant])
    ref = reference_without_eviction(hf, variant, ids)
    if variant in HF_FORWARD:  # the plain reference is HF's forward too while nothing is evicted
        plain = plain_reference(hf, ids, sinks=4, window=len(ids))
        assert (plain - ref).abs().max() <= 1e-4
    for chunk in (16, 1):  # chunked prefill, then the decode path token by token
        ours = engine_for(checkpoints[variant], window=200, slots=1).stream_logits(ids, chunk=chunk)
        diff = (ours - ref).abs().max().item()
        MAX_DIFF[variant] = max(MAX_DIFF.get(variant, 0.0), diff)
        assert diff <= 1e-4, (variant, chunk, diff)
    assert ref.abs().max() > 1.0  # logits far from zero: the comparison means something


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_after_eviction_alibi_uses_cache_positions(checkpoints, variant):
    sinks, window = 4, 24
    ids = random_ids(90, seed=2)  # ~3x the window: the ring wraps
    hf = hf_model(checkpoints[variant])
    ref = plain_reference(hf, ids, sinks, window)
    for chunk in (10, 1):
        ours = engine_for(checkpoints[variant], sinks=sinks, window=window, slots=1, prefill_chunk=10).stream_logits(
            ids, chunk=chunk
        )
        diff = (ours - ref).abs().max().item()
        MAX_DIFF_EVICTED[variant] = max(MAX_DIFF_EVICTED.get(variant, 0.0), diff)
        assert diff <= 1e-4, (variant, chunk, diff)


@torch.no_grad()
def test_text_distance_rule_differs_after_eviction(checkpoints):
    """The rule the paper rejects (bias from distances in the original text) agrees while nothing is evicted
    and departs from the engine once the window slides; the cache-position rule is the engine's."""
    sinks, window = 4, 24
    ids = random_ids(90, seed=3)
    hf = hf_model(checkpoints["mpt"])
    by_cache = plain_reference(hf, ids, sinks, window, rule="cache")
    by_text = plain_reference(hf, ids, sinks, window, rule="text")
    ours = engine_for(checkpoints["mpt"], sinks=sinks, window=window, slots=1, prefill_chunk=10).stream_logits(ids)
    held = sinks + window
    assert torch.allclose(by_text[:held], by_cache[:held], atol=1e-5, rtol=0)  # same until the first eviction
    assert (ours - by_cache).abs().max() <= 1e-4
    assert (ours[held:] - by_text[held:]).abs().max() > 0.1  # the sinks sit far back in the text
    assert (ours[held:].argmax(-1) != by_text[held:].argmax(-1)).any()


@torch.no_grad()
def test_sinkless_policies(checkpoints):
    """window (no sinks, the ring alone) matches the plain reference with 0 sinks; dense (no eviction) matches
    HF: the sink-less attention path carries the bias too."""
    ids = random_ids(70, seed=5)
    hf = hf_model(checkpoints["mpt"])
    ref = plain_reference(hf, ids, sinks=0, window=20)
    dense_ref = hf(torch.tensor([ids])).logits[0]
    for chunk in (10, 1):
        ours = engine_for(checkpoints["mpt"], policy="window", window=20, slots=1, prefill_chunk=10).stream_logits(
            ids, chunk=chunk)
        assert (ours - ref).abs().max() <= 1e-4, chunk
        dense = engine_for(checkpoints["mpt"], policy="dense", slots=1, prefill_chunk=10).stream_logits(ids, chunk=chunk)
        assert (dense - dense_ref).abs().max() <= 1e-4, chunk


@torch.no_grad()
def test_recompute_is_a_fresh_hf_forward_over_the_held_tokens(checkpoints):
    """Sliding window with re-computation, with and without sinks: the score of token t is HF's forward over
    the held tokens, which sit at positions 0..n-1 (so the ALiBi of a fresh encoding is the cache's)."""
    ids = random_ids(90, seed=6)
    hf = hf_model(checkpoints["mpt"])
    for sinks, window in ((4, 24), (0, 24)):
        recompute = engine_for(checkpoints["mpt"], policy="recompute", sinks=sinks, window=window, slots=1).score(
            ids).nll
        for t in (40, 77):
            context = ids[:sinks] + ids[t + 1 - window : t + 1]
            fresh = -torch.log_softmax(hf(torch.tensor([context])).logits[0, -1], -1)[ids[t + 1]].item()
            assert recompute[t] == pytest.approx(fresh, abs=1e-4), (sinks, t)


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
    values (the head by its Q8_0 values; tied, the embedding too) is the reference for the bfloat16 int4 engine."""
    hf = hf_model(checkpoints[variant])
    for module in hf.modules():
        if isinstance(module, torch.nn.Linear) and module is not hf.lm_head:
            module.weight.copy_(dequantize(*quantize_q4_1(module.weight)))
    head = hf.lm_head.weight
    halves = dequantize(*quantize_q8_0_split(head))
    head.copy_(halves[:, : head.shape[1]] + halves[:, head.shape[1] :])
    ids = random_ids(60, seed=4)
    ref = reference_without_eviction(hf, variant, ids)
    for chunk in (1, 16):  # the packed kernel (decode rows), the de-quantized GEMM (prefill)
        engine = engine_for(checkpoints[variant], window=128, slots=1, dtype="bfloat16", weights="int4",
                            packed_max_rows=4)
        ours = engine.stream_logits(ids, chunk=chunk).float()
        assert (ours - ref).abs().max() <= 0.03 * ref.abs().max(), (chunk, (ours - ref).abs().max())
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9  # bfloat16 near-ties


def test_tensor_parallel_is_refused_naming_the_families_that_split(checkpoints):
    with pytest.raises(UnsupportedModel, match="MptForCausalLM cannot be split .* Llama, GPT-NeoX"):
        load_engine(EngineConfig(model=str(checkpoints["mpt"]), sinks=4, window=32, slots=1, device="cpu",
                                 num_threads=1, dtype="float32", weights="dense"), tensor_parallel=2)


def test_config_options(checkpoints, tmp_path):
    base = json.loads((checkpoints["mpt"] / "config.json").read_text())

    def with_(attn=None, **top):
        cfg = json.loads(json.dumps(base))
        cfg["attn_config"].update(attn or {})
        cfg.update(top)
        return cfg

    assert mpt.ModelArgs.from_hf(with_(logit_scale="inv_sqrt_d_model")).logit_scale == pytest.approx(64**-0.5)
    assert mpt.ModelArgs.from_hf(with_(expansion_ratio=2)).intermediate_size == 128
    # slopes: 2^(-8 i / n) for a power of two; HF's own function for the rest
    assert torch.equal(mpt.alibi_slopes(4, 8), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    for heads, bias_max in ((6, 8), (12, 4), (32, 8)):
        hf = -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0]
        assert torch.allclose(mpt.alibi_slopes(heads, bias_max), hf, rtol=1e-6, atol=0)
    refused = {
        "alibi": with_(dict(alibi=False)),
        "qk_ln": with_(dict(qk_ln=True)),
        "multiquery_attention": with_(dict(attn_type="multiquery_attention")),
        "kv_n_heads": with_(dict(kv_n_heads=1)),
        "prefix_lm": with_(dict(prefix_lm=True)),
        "no_bias": with_(no_bias=False),
        "norm_type": with_(norm_type="rmsnorm"),
        "ffn_config": with_(ffn_config=dict(ffn_type="mptglu")),
        "logit_scale": with_(logit_scale="bogus"),
    }
    for what, cfg in refused.items():
        with pytest.raises(UnsupportedModel, match=what):
            mpt.ModelArgs.from_hf(cfg)
    # through the loader: a clear error, nothing built
    bad = tmp_path / "qk_ln"
    shutil.copytree(checkpoints["mpt"], bad)
    (bad / "config.json").write_text(json.dumps(refused["qk_ln"]))
    with pytest.raises(UnsupportedModel, match="MPT with qk_ln=True is not supported"):
        engine_for(bad)
