"""gpt-oss family (GptOssForCausalLM): learned attention sinks, a top-k mixture of experts, YaRN RoPE.

- Attention: GQA with biases on q/k/v/o and one learned sink logit per query head, which joins the softmax's
  denominator only (sink_window_attention's `sink_logits`). The model was trained with that sink, so it needs
  fewer (or no) StreamingLLM sink tokens: `sinks` may be 0.
- YaRN: the frequencies are engine/rope.py's "yarn"; its attention factor multiplies cos and sin, i.e. every
  feature of q and k, so it is folded into q/k's rows and biases at load time (as Phi-3's LongRoPE factor).
- MoE: a router with bias picks the top-k experts per token and weights them by a softmax over those k
  logits. Each expert is a clamped SwiGLU: gate clamped above at `limit`, up clamped to +-limit,
  out = (up + 1) * gate * sigmoid(alpha * gate), each projection with a bias. The checkpoint interleaves gate
  and up columns (gate = even, up = odd); they are de-interleaved at load so the split is a contiguous slice.
  Experts stay plain tensors (the hit experts are looped over, as gpt-fast's MoE gathers them), so int4/int8
  packing touches attention and the head only, and the routing is computed at full precision of the model.
- Layers alternate sliding (128) and full attention: sliding layers are the engine's local layers
  (step_inputs.LocalLayers, as Gemma's): a query sees the keys fewer than sliding_window text positions back,
  itself included, intersected with what the cache holds, and no sink tokens (HF's sliding layers have none;
  their learned sink logit still joins the softmax). Full layers see the sink tokens + the rolling window.
- Quantised checkpoints (mxfp4, the published gpt-oss files) are refused: dense bf16/fp32 weights only.

Tensor parallelism: not partitioned (engine/shards.py refuses the family with its shardable-family error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.attention import StepBatch, sink_window_attention
from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.models import llama
from sinkserve.engine.models.common import rope_settings
from sinkserve.engine.rope import yarn_attention_factor
from sinkserve.errors import UnsupportedModel

HF_ARCHITECTURES = ("GptOssForCausalLM",)


@dataclass
class ModelArgs(llama.ModelArgs):
    n_experts: int = 0
    top_k: int = 0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rope_attention_factor: float = 1.0
    local_window: int | None = None  # HF's sliding_window for the sliding layers; None: every layer full
    local_layers: tuple[int, ...] = ()
    local_rope_theta: float = 150000.0  # sliding layers rotate as the full ones (one rotary table)
    local_rope_scaling: dict | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        quant = cfg.get("quantization_config")
        if quant:
            raise UnsupportedModel(
                f"gpt-oss checkpoint quantised as {quant.get('quant_method', quant)!r}: only dense bfloat16/float32 "
                "weights are loaded (de-quantise it first, e.g. transformers' Mxfp4Config(dequantize=True))"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"gpt-oss activation {cfg['hidden_act']!r} is not supported")
        n_heads, n_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        theta, scaling = rope_settings(cfg, default_theta=150000.0)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        max_context = cfg.get("max_position_embeddings", 131072)
        attention_factor = 1.0
        if kind == "yarn":
            attention_factor = yarn_attention_factor(scaling, max_context)
        elif kind not in ("default", None):
            raise UnsupportedModel(f"gpt-oss rope scaling {kind!r} is not supported (supported: default, yarn)")
        # HF's default when layer_types is absent: even layers sliding, odd layers full.
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
        ]
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModel(f"gpt-oss layer types {sorted(unknown)} are not supported")
        sliding = cfg.get("sliding_window")
        local_layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention") if sliding else ()
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_context=max_context,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", True)),
            mlp_bias=True,
            n_experts=cfg["num_local_experts"],
            top_k=cfg["num_experts_per_tok"],
            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            rope_attention_factor=attention_factor,
            local_window=int(sliding) if local_layers else None,
            local_layers=local_layers,
            local_rope_theta=theta,
            local_rope_scaling=scaling,
        )


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.qkv_bias)
        self.sinks = nn.Parameter(torch.zeros(args.n_heads))  # learned sink logit per query head
        self.local = layer in args.local_layers  # a sliding layer: its own window, no sink tokens

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv_heads, self.head_dim)
        v = v.view(n, self.n_kv_heads, self.head_dim)
        out = sink_window_attention(q, k, v, slab, self.layer, batch, local=self.local, sink_logits=self.sinks)
        return self.wo(out.view(n, q_size))


class MoE(nn.Module):
    """Top-k routed experts. w_gate_up [E, dim, 2 * hidden] holds [gate | up] (de-interleaved at load),
    w_down [E, hidden, dim]; x @ w as the checkpoint stores them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        e, dim, hidden = args.n_experts, args.dim, args.intermediate_size
        self.top_k, self.hidden = args.top_k, hidden
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit
        self.router_weight = nn.Parameter(torch.zeros(e, dim))
        self.router_bias = nn.Parameter(torch.zeros(e))
        self.w_gate_up = nn.Parameter(torch.zeros(e, dim, 2 * hidden))
        self.b_gate_up = nn.Parameter(torch.zeros(e, 2 * hidden))
        self.w_down = nn.Parameter(torch.zeros(e, hidden, dim))
        self.b_down = nn.Parameter(torch.zeros(e, dim))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, dim] -> (expert ids [N, k], weights [N, k]): softmax over the k largest router logits."""
        top, experts = F.linear(x, self.router_weight, self.router_bias).topk(self.top_k, dim=-1)
        return experts, top.softmax(dim=-1)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w_gate_up[e] + self.b_gate_up[e]).split(self.hidden, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))) @ self.w_down[e] + self.b_down[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.w_down.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            picks = order[start : start + count]
            start += count
            tokens = picks // self.top_k
            # Each token's experts are added in expert order whatever else is in the step: batching leaves a
            # session's sums unchanged.
            out.index_add_(0, tokens, self.expert(e, x[tokens]) * weights.flatten()[picks, None])
        return out


class Block(llama.Block):
    attention_cls = Attention
    feed_forward_cls = MoE


class Transformer(llama.Transformer):
    block_cls = Block

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
        out["output.weight"] = hf["model.embed_tokens.weight"] if args.tie_embeddings else hf["lm_head.weight"]
        factor = args.rope_attention_factor
        q_k_rows = (args.n_heads + args.n_kv_heads) * args.head_dim
        for i in range(args.n_layers):
            p, o = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            for kind in ("weight", "bias") if args.qkv_bias else ("weight",):
                fused = torch.cat([hf[attn + f"{name}_proj.{kind}"] for name in "qkv"])
                if factor != 1.0:  # YaRN's cos/sin factor, on every feature of q and k
                    scaled = fused.double()
                    scaled[:q_k_rows] *= factor
                    fused = scaled.to(fused.dtype)
                out[o + f"attention.wqkv.{kind}"] = fused
                out[o + f"attention.wo.{kind}"] = hf[attn + f"o_proj.{kind}"]
            out[o + "attention.sinks"] = hf[attn + "sinks"]
            out[o + "feed_forward.router_weight"] = hf[mlp + "router.weight"]
            out[o + "feed_forward.router_bias"] = hf[mlp + "router.bias"]
            gate_up, gate_up_bias = hf[mlp + "experts.gate_up_proj"], hf[mlp + "experts.gate_up_proj_bias"]
            out[o + "feed_forward.w_gate_up"] = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1)
            out[o + "feed_forward.b_gate_up"] = torch.cat([gate_up_bias[..., 0::2], gate_up_bias[..., 1::2]], dim=-1)
            out[o + "feed_forward.w_down"] = hf[mlp + "experts.down_proj"]
            out[o + "feed_forward.b_down"] = hf[mlp + "experts.down_proj_bias"]
            out[o + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
            out[o + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        return out
