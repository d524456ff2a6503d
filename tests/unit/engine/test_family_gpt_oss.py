"""gpt-oss (learned per-head attention sinks, top-k MoE with the clamped SwiGLU, YaRN) against HF transformers'
own forward before eviction and a plain StreamingLLM reference after it, with 4 and with 0 sink tokens; the MoE
against a dense-equivalent reference; batching, parking, rebuild, int4, tensor parallelism and refusals."""

import json
import math
import shutil
from functools import partial

import pytest
import torch
import transformers

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.quant import dequantize, quantize_q4_1, quantize_q8_0_split
from sinkserve.engine.rope import inv_frequencies, yarn_attention_factor
from sinkserve.engine.testing import TOKENIZER_FILES, random_ids
from sinkserve.engine.weights import prepare_bundled_model
from sinkserve.errors import InvalidArgument, UnsupportedModel

import family_checks
from family_checks import engine_for, hf_model

VOCAB = 49152  # the bundled tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
              intermediate_size=32, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    # As shipped: YaRN (factor 32 over 4096), sliding / full layers alternating. The sliding window (8) is
    # narrower than every cache built here, so the sliding layers' own masks are what is tested.
    "yarn_alternating": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    # Plain RoPE, full attention everywhere, multi-head (no GQA), 3 of 6 experts per token.
    "full_mha": dict(num_key_value_heads=4, num_local_experts=6, num_experts_per_tok=3, sliding_window=8,
                     layer_types=["full_attention", "full_attention"],
                     rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
}
SINKS = (4, 0)
MAX_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    source = prepare_bundled_model(progress=False)
    made = {}
    for name, extra in VARIANTS.items():
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**COMMON, **extra))
        with torch.no_grad():  # random init is small: scale up so attention and routing are far from uniform
            for pname, p in model.named_parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
                elif pname.endswith("sinks"):
                    p.copy_(2.0 * torch.randn_like(p))  # sink logits that take a real share of the softmax
                else:
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
@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_hf_before_eviction(checkpoints, variant, sinks):
    ids = random_ids(100, seed=1)
    ref = hf_model(checkpoints[variant])(torch.tensor([ids])).logits[0]
    for chunk in (16, 1):  # chunked prefill, then the decode path token by token
        ours = engine_for(checkpoints[variant], sinks=sinks, window=200, slots=1).stream_logits(ids, chunk=chunk)
        diff = (ours - ref).abs().max().item()
        key = f"{variant}/sinks={sinks}"
        MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), diff)
        assert diff <= 1e-4, (variant, sinks, chunk, diff)
    assert ref.abs().max() > 1.0  # logits far from zero: the comparison means something


def test_yarn_frequencies_and_factor_equal_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for truncate in (False, True):
        params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
                  "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
        config = transformers.GptOssConfig(**COMMON, rope_parameters=params)
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
        ours = inv_frequencies(16, 150000.0, params)
        assert torch.allclose(ours.float(), hf_inv_freq, rtol=1e-6, atol=0)
        assert not torch.allclose(ours, inv_frequencies(16, 150000.0))  # the scaling changes some pairs
        factor = yarn_attention_factor(params, 131072)
        assert factor == pytest.approx(hf_factor) == pytest.approx(0.1 * math.log(32) + 1)


# ---- a plain StreamingLLM reference over the HF modules: keys cached before rotation, sinks + the last
# `window` entries kept (the current token included), RoPE at attention time by position inside the cache, and
# the learned sink logit as one more column of each head's softmax, dropped after it.


def _rotate(x, positions, inv_freq, scaling):
    ang = torch.outer(positions.double(), inv_freq.double())
    cos = (torch.cat([ang.cos(), ang.cos()], -1) * scaling).float()[:, None, :]
    sin = (torch.cat([ang.sin(), ang.sin()], -1) * scaling).float()[:, None, :]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class PlainCache:
    """StreamingLLM by the book, one layer: sinks + window entries, rotated by their cache positions. A sliding
    layer (`local_window`) attends only to the held entries fewer than local_window text positions back."""

    def __init__(self, sinks, window, rotary, sink_logits, local_window=None):
        self.sinks, self.window, self.local_window = sinks, window, local_window
        self.inv_freq, self.scaling = rotary.inv_freq, rotary.attention_scaling
        self.sink_logits = sink_logits  # [Hq], or None to leave them out
        self.k, self.v, self.text_pos = [], [], []

    def attend(self, q, k, v):  # q [1, Hq, D], k/v [1, Hkv, D] -> [1, Hq * D]
        now = self.text_pos[-1] + 1 if self.text_pos else 0
        self.k.append(k)
        self.v.append(v)
        self.text_pos.append(now)
        if len(self.k) > self.sinks + self.window:
            del self.k[self.sinks], self.v[self.sinks], self.text_pos[self.sinks]
        keys, values = torch.cat(self.k), torch.cat(self.v)
        n, group = keys.shape[0], q.shape[1] // keys.shape[1]
        positions = torch.arange(n)
        if self.local_window is not None:  # the sliding layer's own window, by text distance
            near = torch.tensor([now - t < self.local_window for t in self.text_pos])
            keys, values, positions = keys[near], values[near], positions[near]
        q_rot = _rotate(q, positions[-1:], self.inv_freq, self.scaling)
        k_rot = _rotate(keys, positions, self.inv_freq, self.scaling).repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_rot, k_rot) / q.shape[-1] ** 0.5  # [Hq, 1, keys]
        if self.sink_logits is None:
            probs = scores.softmax(-1)
        else:
            probs = torch.cat([scores, self.sink_logits[:, None, None]], -1).softmax(-1)[..., :-1]
        return torch.einsum("hqk,khd->qhd", probs, values).reshape(1, -1)


def plain_reference(hf, ids, sinks, window, learned_sinks=True):
    inner = hf.model
    kinds = hf.config.layer_types
    caches = [PlainCache(sinks, window, inner.rotary_emb, layer.self_attn.sinks if learned_sinks else None,
                         hf.config.sliding_window if kinds[i] == "sliding_attention" else None)
              for i, layer in enumerate(inner.layers)]
    logits = []
    for token in ids:
        x = inner.embed_tokens(torch.tensor([token]))
        for layer, cache in zip(inner.layers, caches):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            d = attn.head_dim
            q, k, v = (proj(h).view(1, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            x = x + attn.o_proj(cache.attend(q, k, v))
            x = x + layer.mlp(layer.post_attention_layernorm(x)[None])[0][0]
        logits.append(hf.lm_head(inner.norm(x)))
    return torch.cat(logits)


@torch.no_grad()
@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_after_eviction_positions_are_inside_the_cache(checkpoints, variant, sinks):
    window = 24
    ids = random_ids(90, seed=2)  # ~3x the window: the ring wraps
    hf = hf_model(checkpoints[variant])
    ref = plain_reference(hf, ids, sinks, window)
    # the reference itself agrees with HF while nothing is evicted
    full = hf(torch.tensor([ids[: sinks + window]])).logits[0]
    assert torch.allclose(ref[: sinks + window], full, atol=1e-4, rtol=0)
    for chunk in (10, 1):
        ours = engine_for(checkpoints[variant], sinks=sinks, window=window, slots=1, prefill_chunk=10).stream_logits(
            ids, chunk=chunk
        )
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (variant, sinks, chunk, (ours - ref).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("sinks", SINKS)
def test_learned_sinks_take_part_in_the_softmax(checkpoints, sinks):
    """The same plain reference without the sink column is far from the engine: the learned sinks are used, and
    used as a denominator term (the reference that has them matches above)."""
    path = checkpoints["yarn_alternating"]
    ids = random_ids(60, seed=3)
    hf = hf_model(path)
    ours = engine_for(path, sinks=sinks, window=24, slots=1, prefill_chunk=10).stream_logits(ids, chunk=10)
    with_sinks = plain_reference(hf, ids, sinks, 24)
    without = plain_reference(hf, ids, sinks, 24, learned_sinks=False)
    assert (ours - with_sinks).abs().max() <= 1e-4
    assert (ours - without).abs().max() > 0.1


# ---- the mixture of experts against a dense equivalent: every expert on every token, weighted by the routing
# (zero for the experts not chosen), written from the checkpoint's own tensors.


def dense_moe(mlp, x, top_k, alpha, limit):
    router = mlp.router
    logits = x @ router.weight.T + router.bias
    top, chosen = logits.topk(top_k, dim=-1)
    weight = torch.zeros_like(logits).scatter(1, chosen, top.softmax(-1))  # [N, E]
    experts = mlp.experts
    out, largest = torch.zeros_like(x), 0.0
    for e in range(logits.shape[1]):
        h = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        largest = max(largest, h.abs().max().item())
        gate, up = h[:, 0::2], h[:, 1::2]  # interleaved columns
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        y = ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ experts.down_proj[e] + experts.down_proj_bias[e]
        out += weight[:, e : e + 1] * y
    return out, largest


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_equals_a_dense_equivalent(checkpoints, variant):
    hf = hf_model(checkpoints[variant])
    engine = engine_for(checkpoints[variant], slots=1)
    cfg = hf.config
    torch.manual_seed(5)
    x = 3.0 * torch.randn(40, cfg.hidden_size)
    for layer, ours_layer in zip(hf.model.layers, engine.runner.model.layers):
        ref, largest = dense_moe(layer.mlp, x, cfg.num_experts_per_tok, cfg.swiglu_alpha, cfg.swiglu_limit)
        assert largest > cfg.swiglu_limit  # the clamps are exercised
        ours = ours_layer.feed_forward(x)
        hf_out = layer.mlp(x[None])[0][0]
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5), (ours - ref).abs().max()
        assert torch.allclose(hf_out, ref, atol=1e-4, rtol=1e-5)
        # the batch does not change a token's result: each row alone gives the same
        alone = torch.cat([ours_layer.feed_forward(x[i : i + 1]) for i in range(4)])
        assert torch.allclose(alone, ours[:4], atol=1e-5, rtol=0)
    assert cfg.num_experts_per_tok < cfg.num_local_experts


@torch.no_grad()
@pytest.mark.parametrize("sinks", SINKS)
def test_recompute_and_streaming_scores_with_any_sink_count(checkpoints, sinks):
    """The other policies take learned sinks too, also with 0 sink tokens: recompute scores each token as HF's
    forward over just the tokens the cache holds; streaming scores equal its own stream of logits."""
    path = checkpoints["yarn_alternating"]
    ids, window = random_ids(70, seed=6), 24
    hf = hf_model(path)
    recompute = engine_for(path, policy="recompute", sinks=sinks, window=window, slots=1)
    nll = recompute.score(ids, chunk=8).nll
    for t in range(0, len(ids) - 1, 7):
        held = ids[: t + 1] if t + 1 <= sinks + window else ids[:sinks] + ids[t + 1 - window : t + 1]
        logp = hf(torch.tensor([held])).logits[0, -1].log_softmax(-1)
        assert abs(nll[t] + logp[ids[t + 1]].item()) <= 1e-4, (t, nll[t], -logp[ids[t + 1]].item())
    streaming = engine_for(path, sinks=sinks, window=window, slots=1, prefill_chunk=8)
    logp = streaming.stream_logits(ids, chunk=8).log_softmax(-1)
    expected = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    scored = torch.tensor(streaming.score(ids, chunk=8).nll, dtype=torch.float64)
    assert torch.allclose(scored, expected.double(), atol=1e-4)


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_decode_equals_each_session_alone(checkpoints, variant, sinks):
    family_checks.batched_decode_equals_each_session_alone(partial(engine_for, checkpoints[variant], sinks=sinks))


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_park_and_unpark_are_exact(checkpoints, variant, sinks):
    family_checks.park_and_unpark_are_exact(partial(engine_for, checkpoints[variant], sinks=sinks))


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rebuild_from_transcript(checkpoints, variant, sinks):
    family_checks.rebuild_from_transcript(partial(engine_for, checkpoints[variant], sinks=sinks),
                                          evicted_entries=sinks + 32)


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int4_engine_matches_hf_on_the_quantized_weights(checkpoints, variant):
    """As tests/unit/engine/test_quant.py: HF's fp32 forward with its linear layers (q/k/v/o) replaced by their
    Q4_1 values and the head by its Q8_0 values is the reference for the bfloat16 int4 engine. The router and
    the experts are not linear layers in either model and stay dense; YaRN's factor folded into q/k's rows
    quantizes to the same values (per-row blocks scale with their row)."""
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


def test_tensor_parallel_is_refused_with_the_shardable_family_error(checkpoints):
    with pytest.raises(UnsupportedModel, match="GptOssForCausalLM cannot be split .* Llama, GPT-NeoX"):
        load_engine(EngineConfig(model=str(checkpoints["full_mha"]), sinks=4, window=32, slots=1, device="cpu",
                                 num_threads=1, dtype="float32", weights="dense"), tensor_parallel=2)


def _edited(src, tmp_path, name, **changes):
    out = tmp_path / name
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_sliding_layers_are_local_layers_with_their_own_window(checkpoints, tmp_path):
    """Sliding layers take the engine's local-layer masks, whatever the cache size; full layers and configs
    without sliding layers have none. (The logit tests above check the masks against HF and the reference.)"""
    engine = engine_for(checkpoints["yarn_alternating"], sinks=4, window=32, slots=1)
    assert (engine.runner.local.window, engine.runner.local.layers) == (8, (0,))
    assert engine.runner.args.max_context > 32  # not capped at the sliding window
    assert engine_for(checkpoints["full_mha"], sinks=4, window=32, slots=1).runner.local is None  # no such layer


def test_quantised_and_unknown_checkpoints_are_refused(checkpoints, tmp_path):
    mxfp4 = _edited(checkpoints["full_mha"], tmp_path, "mxfp4",
                    quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]})
    with pytest.raises(UnsupportedModel, match="mxfp4.*dense"):
        engine_for(mxfp4)
    other_rope = _edited(checkpoints["full_mha"], tmp_path, "rope",
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 150000.0})
    with pytest.raises(UnsupportedModel, match="dynamic"):
        engine_for(other_rope)
