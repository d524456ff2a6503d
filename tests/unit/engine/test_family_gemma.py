"""Gemma 2 and Gemma 3 (text): HF transformers' own forward before eviction (local layers masking exactly as
HF's sliding window), a plain reference written here after it (global layers: sinks + window; local layers:
keys fewer than sliding_window text positions back, no sinks), batching, parking, rebuild, int4, and the
tensor-parallel refusal."""

import json
import shutil
from functools import partial

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.models import gemma
from sinkserve.engine.quant import dequantize, quantize_q4_1, quantize_q8_0_split
from sinkserve.engine.step_inputs import RowInput
from sinkserve.engine.testing import TOKENIZER_FILES, random_ids
from sinkserve.engine.weights import prepare_bundled_model
from sinkserve.errors import UnsupportedModel

import family_checks
from family_checks import engine_for, hf_model

VOCAB = 49152  # the bundled tokenizer's
LOCAL = 8  # sliding_window, below the engine's window
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              sliding_window=LOCAL, max_position_embeddings=4096,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
VARIANTS = {
    # query_pre_attn_scalar != head_dim (as Gemma 2 27B), both soft-cappings on (the Gemma 2 defaults)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # q/k norms, local base 10k vs global 1M with linear scaling on global layers only (as Gemma 3 4B+)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        query_pre_attn_scalar=16, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})),
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
                else:
                    p.add_(0.1 * torch.randn_like(p))  # norm weights away from 0 (Gemma norms scale by 1 + w)
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


def test_config_reading():
    """Both config layouts: transformers>=5 `rope_parameters` per layer type, and the older flat keys with a
    sliding_window_pattern."""
    new = dict(COMMON, **VARIANTS["gemma3"][2], architectures=["Gemma3ForCausalLM"], model_type="gemma3_text")
    args = gemma.ModelArgs.from_hf(new)
    assert args.local_layers == (0, 2) and args.local_window == LOCAL and args.qk_norm
    assert (args.rope_theta, args.rope_scaling["factor"]) == (1e6, 4.0)
    assert (args.local_rope_theta, args.local_rope_scaling) == (1e4, None)
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=6, num_hidden_layers=12)
    args = gemma.ModelArgs.from_hf(old)
    assert args.local_layers == tuple(i for i in range(12) if i not in (5, 11))
    assert (args.rope_theta, args.rope_scaling["factor"], args.local_rope_theta) == (1e6, 8.0, 1e4)
    g2 = dict(COMMON, **VARIANTS["gemma2"][2], architectures=["Gemma2ForCausalLM"], model_type="gemma2")
    del g2["layer_types"]
    args = gemma.ModelArgs.from_hf(g2)
    assert args.local_layers == (0, 2) and args.attn_softcap == 50.0 and args.final_softcap == 30.0
    assert args.local_rope_theta == args.rope_theta and not args.qk_norm
    with pytest.raises(UnsupportedModel, match="activation"):
        gemma.ModelArgs.from_hf(dict(g2, hidden_activation="relu"))


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_hf_before_eviction(checkpoints, variant):
    hf = hf_model(checkpoints[variant])
    for n, window in ((36, 32), (100, 200)):  # exactly sinks + window (the cache full, nothing evicted); longer
        ids = random_ids(n, seed=1)
        ref = hf(torch.tensor([ids])).logits[0]
        for chunk in (16, 5, 1):  # chunked prefill, then the decode path token by token
            ours = engine_for(checkpoints[variant], window=window, slots=1).stream_logits(ids, chunk=chunk)
            diff = (ours - ref).abs().max().item()
            MAX_DIFF[variant] = max(MAX_DIFF.get(variant, 0.0), diff)
            assert diff <= 1e-4, (variant, n, chunk, diff)
    assert ref.abs().max() > 1.0  # logits far from zero: the comparison means something
    # ... and the sliding window matters: HF with every layer global gives other logits
    config = json.loads((checkpoints[variant] / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * len(config["layer_types"])
    dense = AutoModelForCausalLM.from_config(getattr(transformers, VARIANTS[variant][0])(**config)).eval()
    dense.load_state_dict(hf.state_dict())
    assert (dense(torch.tensor([ids])).logits[0] - ref).abs().max() > 1e-2


# ---- a plain StreamingLLM reference over the HF modules. Each layer keeps sinks + the last `window` entries
# (the current token included), keys before rotation, RoPE at attention time by position inside the cache;
# a layer with a `horizon` attends only to held keys fewer than `horizon` text positions back.


def _rotate(x, positions, inv_freq):
    ang = torch.outer(positions.double(), inv_freq.double())
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None, :]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class PlainCache:
    def __init__(self, sinks, window, inv_freq, horizon=None):
        self.sinks, self.window, self.inv_freq, self.horizon = sinks, window, inv_freq, horizon
        self.k, self.v, self.text = [], [], []
        self.seen = 0

    def attend(self, q, k, v, scale, softcap):  # q [1, Hq, D], k/v [1, Hkv, D] -> [1, Hq * D]
        self.k.append(k)
        self.v.append(v)
        self.text.append(self.seen)
        self.seen += 1
        if len(self.k) > self.sinks + self.window:
            del self.k[self.sinks], self.v[self.sinks], self.text[self.sinks]
        keys, values = torch.cat(self.k), torch.cat(self.v)
        n, group = keys.shape[0], q.shape[1] // keys.shape[1]
        positions = torch.arange(n)  # inside the cache
        q_rot = _rotate(q, positions[-1:], self.inv_freq)
        k_rot = _rotate(keys, positions, self.inv_freq).repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_rot, k_rot) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if self.horizon is not None:
            far = torch.tensor([self.seen - 1 - t >= self.horizon for t in self.text])
            scores = scores.masked_fill(far, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(1, -1)


def _inv_freq(hf, local):
    rotary = hf.model.rotary_emb
    if hasattr(rotary, "inv_freq"):  # Gemma 2: one table for both kinds
        return rotary.inv_freq
    return getattr(rotary, ("sliding_attention" if local else "full_attention") + "_inv_freq")


def plain_reference(hf, ids, sinks, window, local_sinks=0, global_sinks=None):
    """The engine's rule by default: global layers sinks + window, local layers the keys fewer than
    sliding_window positions back with no sinks of their own. `local_sinks` / `global_sinks` change it, to show
    the rule is what the engine follows."""
    cfg = hf.config
    global_sinks = sinks if global_sinks is None else global_sinks
    caches = []
    for kind in cfg.layer_types:
        local = kind == "sliding_attention"
        if local and local_sinks:  # a local layer that always keeps the sinks too
            caches.append(PlainCache(local_sinks, cfg.sliding_window - local_sinks, _inv_freq(hf, True)))
        elif local:
            caches.append(PlainCache(sinks, window, _inv_freq(hf, True), horizon=cfg.sliding_window))
        else:
            caches.append(PlainCache(global_sinks, window + sinks - global_sinks, _inv_freq(hf, False)))
    logits = []
    for token in ids:
        x = hf.model.embed_tokens(torch.tensor([token]))  # scaled by sqrt(hidden) inside
        for layer, cache in zip(hf.model.layers, caches):
            attn, d = layer.self_attn, layer.self_attn.head_dim
            h = layer.input_layernorm(x)
            q, k, v = (proj(h).view(1, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            out = attn.o_proj(cache.attend(q, k, v, attn.scaling, attn.attn_logit_softcapping))
            x = x + layer.post_attention_layernorm(out)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        out = hf.lm_head(hf.model.norm(x))
        if cfg.final_logit_softcapping is not None:
            out = torch.tanh(out / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        logits.append(out)
    return torch.cat(logits)


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_after_eviction_sinks_on_global_layers_only(checkpoints, variant):
    sinks, window = 4, 24
    ids = random_ids(150, seed=2)  # ~6x the window: the ring wraps and the window frame is rebased
    hf = hf_model(checkpoints[variant])
    ref = plain_reference(hf, ids, sinks, window)
    # the reference itself agrees with HF while nothing is evicted
    full = hf(torch.tensor([ids[: sinks + window]])).logits[0]
    assert torch.allclose(ref[: sinks + window], full, atol=1e-4, rtol=0)
    for chunk in (10, 1):
        engine = engine_for(checkpoints[variant], sinks=sinks, window=window, slots=1, prefill_chunk=10)
        ours = engine.stream_logits(ids, chunk=chunk)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (variant, chunk, (ours - ref).abs().max())
    # the other rules give other logits once the window slides: sinks on local layers too, or none anywhere
    evicted = slice(sinks + window, None)
    for other in (plain_reference(hf, ids, sinks, window, local_sinks=sinks),
                  plain_reference(hf, ids, sinks, window, global_sinks=0)):
        assert (other[evicted] - ref[evicted]).abs().max() > 1e-2


@torch.no_grad()
def test_local_window_wider_than_the_ring(checkpoints, tmp_path):
    """sliding_window 40 with sinks 4 + window 24: nothing is masked before eviction (the cache holds fewer
    than 40 tokens); after it a local layer sees the whole ring, and each sink until it is 40 positions back."""
    wide = tmp_path / "wide"
    shutil.copytree(checkpoints["gemma3"], wide)
    config = json.loads((wide / "config.json").read_text())
    config["sliding_window"] = 40
    (wide / "config.json").write_text(json.dumps(config))
    hf = hf_model(wide)
    sinks, window = 4, 24
    ids = random_ids(90, seed=3)
    ref = plain_reference(hf, ids, sinks, window)
    full = hf(torch.tensor([ids[: sinks + window]])).logits[0]
    assert torch.allclose(ref[: sinks + window], full, atol=1e-4, rtol=0)
    for chunk in (10, 1):
        ours = engine_for(wide, sinks=sinks, window=window, slots=1, prefill_chunk=10).stream_logits(ids, chunk=chunk)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (chunk, (ours - ref).abs().max())


def test_window_policy_and_rebase_per_layer_frequencies(checkpoints):
    """No sinks (the `window` policy): every layer takes the explicit-score path, and local layers still
    mask; the window frame moves (KVSlab.rebase with each layer's own frequencies) and nothing changes."""
    hf = hf_model(checkpoints["gemma3"])
    ids = random_ids(120, seed=5)
    with torch.no_grad():
        ref = plain_reference(hf, ids, 0, 28)
    engine = engine_for(checkpoints["gemma3"], sinks=0, window=28, slots=1, policy="window", prefill_chunk=10)
    runner = engine.runner
    ours = torch.cat([runner.forward([RowInput(0, ids[i : i + 10], "all")])[0] for i in range(0, len(ids), 10)])
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()
    assert int(runner.slab.base[0]) > 0  # the frame moved
    assert runner.local.rope is not runner.rope  # Gemma 3: local layers have their own tables
    assert [f is runner.local.rope.inv_freq for f in runner._rebase_freq] == [True, False, True, False]


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dense_and_recompute_policies(checkpoints, variant):
    """`dense` (no eviction, no sinks) is HF's forward; `recompute` re-encodes sinks + window each token, so
    its last logits equal HF's forward over those ids."""
    hf = hf_model(checkpoints[variant])
    ids = random_ids(50, seed=6)
    ref = hf(torch.tensor([ids])).logits[0]
    dense = engine_for(checkpoints[variant], policy="dense", max_context=64, slots=1).stream_logits(ids, chunk=16)
    assert (dense - ref).abs().max() <= 1e-4
    sinks, window = 4, 20
    engine = engine_for(checkpoints[variant], policy="recompute", sinks=sinks, window=window, slots=1)
    held = engine.runner.recompute_context(0, ids)  # sinks + the last window ids, slot emptied
    last = engine.runner.forward([RowInput(0, held, "last")])[0]
    expect = hf(torch.tensor([ids[:sinks] + ids[-window:]])).logits[0, -1]
    assert (last[0] - expect).abs().max() <= 1e-4


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
    values (the tied head and embedding by its Q8_0 values) is the reference for the bfloat16 int4 engine."""
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensor_parallel_is_refused_naming_the_families_that_split(checkpoints, variant):
    config = EngineConfig(model=str(checkpoints[variant]), sinks=4, window=32, slots=1, device="cpu",
                          num_threads=1, dtype="float32", weights="dense")
    arch = VARIANTS[variant][1]
    with pytest.raises(UnsupportedModel, match=f"{arch} cannot be split .* Llama, GPT-NeoX"):
        load_engine(config, tensor_parallel=2, oversubscribe=True)
