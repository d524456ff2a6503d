"""weights=int4: the block formats round-trip, the packed kernel computes the de-quantized model, and the
bundled checkpoint's GGUF blocks come back exactly."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sinkserve.config import EngineConfig
from sinkserve.engine import load_engine
from sinkserve.engine.quant import GROUP, PackedLinear, dequantize, quantize_q4_1, quantize_q8_0_split
from sinkserve.engine.testing import random_ids
from sinkserve.engine.weights import prepare_bundled_model


def _q4_1_blocks(out_features, in_features, seed=0):
    """Weights as a Q4_1 GGUF stores them: per block of 32, q in 0..15 (both ends used), fp16 d and m."""
    g = torch.Generator().manual_seed(seed)
    blocks = in_features // GROUP
    q = torch.randint(0, 16, (out_features, blocks, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(out_features, blocks, 1, generator=g).half().float() * 0.01 + 1e-4
    m = (torch.randn(out_features, blocks, 1, generator=g) * 0.05).half().float()
    return (q * d + m).flatten(1)


def _q8_0_blocks(out_features, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = in_features // GROUP
    q = torch.randint(-127, 128, (out_features, blocks, GROUP), generator=g)
    q[..., 0] = 127 * torch.where(torch.rand(out_features, blocks, generator=g) < 0.5, -1, 1)
    d = torch.rand(out_features, blocks, 1, generator=g).half().float() * 0.002 + 1e-5
    return (q * d).flatten(1)


def test_q4_1_blocks_come_back_exactly_and_other_weights_round_to_nearest():
    weight = _q4_1_blocks(48, 128)
    q, scale, zero = quantize_q4_1(weight)
    assert int(q.min()) == 0 and int(q.max()) == 15
    assert torch.allclose(dequantize(q, scale, zero), weight, rtol=0, atol=1e-6)

    plain = torch.randn(48, 128)
    q, scale, zero = quantize_q4_1(plain)
    error = (dequantize(q, scale, zero) - plain).abs().view(48, -1, GROUP)
    assert bool((error <= scale[..., None] / 2 + 1e-6).all())  # nearest of 16 levels per block


def test_q8_0_blocks_come_back_exactly_through_two_int4_halves():
    weight = _q8_0_blocks(40, 96)
    q, scale, zero = quantize_q8_0_split(weight)
    assert q.shape == (40, 192) and int(q.min()) >= 0 and int(q.max()) <= 15
    halves = dequantize(q, scale, zero)
    assert torch.allclose(halves[:, :96] + halves[:, 96:], weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("split_q8,bias", [(False, False), (False, True), (True, False)])
def test_packed_linear_computes_the_dequantized_weights(split_q8, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=bias)
    packed = PackedLinear(linear, max_rows=4, split_q8=split_q8).to(torch.bfloat16)
    reference_weight = packed.weight.float()  # the quantized values, in the model dtype
    for rows in (1, 4, 9):  # 1 and 4 run the packed kernel, 9 the plain GEMM
        x = torch.randn(rows, 128)
        ref = F.linear(x, reference_weight, None if linear.bias is None else linear.bias.detach().bfloat16().float())
        out = packed(x.bfloat16()).float()
        assert out.shape == (rows, 96)
        assert (out - ref).abs().max() <= 0.02 * ref.abs().max(), rows


@pytest.mark.slow
def test_bundled_checkpoint_gets_its_gguf_blocks_back():
    """The bundled checkpoint was de-quantized from Q4_1 (linear layers) and Q8_0 (embeddings): quantizing it
    again with the same rules gives back the very same values, so weights=int4 runs the file's own weights."""
    state = load_file(prepare_bundled_model() / "model.safetensors")
    checked = 0
    for name, weight in state.items():
        if weight.dim() != 2:
            continue
        if "embed_tokens" in name:
            q, scale, zero = quantize_q8_0_split(weight)
            halves = dequantize(q, scale, zero)
            again = halves[:, : weight.shape[1]] + halves[:, weight.shape[1] :]
        else:
            again = dequantize(*quantize_q4_1(weight))
        assert (again - weight).abs().max() <= 1e-6 * weight.abs().max(), name
        checked += 1
    assert checked == 30 * 7 + 1


@torch.no_grad()
def test_int4_engine_matches_hf_on_the_quantized_weights(tiny_llama):
    """HF's fp32 forward with every linear layer replaced by its quantized values is the reference; the int4
    engine runs bfloat16, so the tolerance is bfloat16's. Chunk 1 decodes through the packed kernel, chunk 16
    prefills through the plain GEMM."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for module in hf.modules():
        if isinstance(module, torch.nn.Linear) and module is not hf.lm_head:
            module.weight.copy_(dequantize(*quantize_q4_1(module.weight)))
    head = hf.lm_head.weight  # tied to the embeddings
    q, scale, zero = quantize_q8_0_split(head)
    halves = dequantize(q, scale, zero)
    head.copy_(halves[:, : head.shape[1]] + halves[:, head.shape[1] :])
    ids = random_ids(80, seed=4)
    ref = hf(torch.tensor([ids])).logits[0]
    for chunk in (1, 16):
        engine = load_engine(EngineConfig(model=str(tiny_llama), sinks=4, window=128, slots=1, device="cpu",
                                          dtype="bfloat16", weights="int4", packed_max_rows=4, prefill_chunk=16))
        ours = engine.stream_logits(ids, chunk=chunk).float()
        assert (ours - ref).abs().max() <= 0.03 * ref.abs().max(), (chunk, (ours - ref).abs().max())
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_int4_needs_a_16_bit_dtype():
    with pytest.raises(ValidationError, match="weights=int4 needs dtype bfloat16 or float16"):
        EngineConfig(weights="int4", dtype="float32")
    assert EngineConfig(weights="int4", dtype="float16").weights == "int4"


needs_fbgemm = pytest.mark.skipif(not __import__("sinkserve.engine.quant", fromlist=["x"]).int8_kernel_available(),
                                  reason="fbgemm's int8 GEMM needs a CPU with AVX2")


@needs_fbgemm
def test_int8_linear_is_close_to_its_dequantized_weights_and_batch_invariant():
    from sinkserve.engine.quant import Int8Linear, quantize_int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 96, bias=True)
    module = Int8Linear(linear, max_rows=64)
    q, scale = quantize_int8(linear.weight)
    assert torch.equal(module.weight, q.float() * scale[:, None])
    x = torch.randn(12, 192)
    x[3] *= 50  # one row with large activations must not coarsen the others' grid
    ref = F.linear(x, module.weight, linear.bias)
    out = module(x)
    assert ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 2e-3  # ~13-bit activations
    alone = torch.cat([module(x[i : i + 1]) for i in range(12)])
    assert torch.equal(alone, out)  # a row's result does not depend on the other rows of its step
    big = torch.randn(65, 192)  # past max_rows: the float32 GEMM on the same de-quantized weights
    assert torch.allclose(module(big), F.linear(big, module.weight, linear.bias), atol=1e-5)


@needs_fbgemm
def test_int8_weights_compute_the_dequantized_model(tiny_llama):
    from sinkserve.engine.quant import quantize_int8

    ids = random_ids(80, seed=5)
    dense = load_engine(EngineConfig(model=str(tiny_llama), sinks=4, window=32, slots=1, device="cpu",
                                     dtype="float32", weights="dense", prefill_chunk=16))
    with torch.no_grad():  # the reference: the float32 model holding the int8 weights' values
        for module in dense.runner.model.modules():
            if isinstance(module, torch.nn.Linear):
                q, scale = quantize_int8(module.weight)
                module.weight.copy_(q.float() * scale[:, None])
    ref = dense.stream_logits(ids, chunk=1)
    engine = load_engine(EngineConfig(model=str(tiny_llama), sinks=4, window=32, slots=1, device="cpu",
                                      dtype="auto", weights="int8", prefill_chunk=16))
    assert engine.paths.dtype == "float32" and engine.paths.weights == "int8"
    for chunk in (1, 16):  # decode rows on the int8 GEMM; 16-row chunks past max_rows on the float32 one
        ours = engine.stream_logits(ids, chunk=chunk)
        assert (ours - ref).abs().max() <= 2e-3 * ref.abs().max(), (chunk, (ours - ref).abs().max())
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
