"""Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2 (RoPE, grouped-query attention, SwiGLU, RMSNorm)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.attention import StepBatch, sink_window_attention
from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.models.common import rope_settings

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_context: int
    tie_embeddings: bool
    qkv_bias: bool  # Qwen2
    mlp_bias: bool

    @property
    def rot_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        n_heads = cfg["num_attention_heads"]
        theta, scaling = rope_settings(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_context=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # RMSNorm(x) is the first half of LayerNorm([x, -x]): that vector has mean zero and mean square
        # mean(x^2). On CPU layer_norm is one fused kernel (float32 inside for 16-bit inputs) while rms_norm
        # runs as ~10 operators. The weight is applied after the rounding to x's dtype, as the reference does.
        dim = x.shape[-1]
        return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * dim,), eps=self.eps)[..., :dim] * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)  # q, k, v fused: one GEMM
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv_heads, self.head_dim)
        v = v.view(n, self.n_kv_heads, self.head_dim)
        out = sink_window_attention(q, k, v, slab, self.layer, batch)
        return self.wo(out.view(n, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden = args.intermediate_size
        self.w_gate_up = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # fused gate + up
        self.w_down = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.hidden, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    # what a family built on this block swaps in (Qwen3's normed attention, gpt-oss's sinks and experts)
    attention_cls: type[nn.Module] = Attention
    feed_forward_cls: type[nn.Module] = FeedForward

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = self.attention_cls(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = self.feed_forward_cls(args)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), slab, batch)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    block_cls: type[nn.Module] = Block

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(self.block_cls(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        """Runs the step's tokens through the model; returns logits for batch.logits_index only."""
        x = self.tok_embeddings(batch.token_ids)
        for layer in self.layers:
            x = layer(x, slab, batch)
        x = self.norm(x.index_select(0, batch.logits_index))
        return self.output(x)

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """HF parameter names -> ours (q/k/v and gate/up fused)."""
        out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
        out["output.weight"] = hf["model.embed_tokens.weight"] if args.tie_embeddings else hf["lm_head.weight"]
        for i in range(args.n_layers):
            p = f"model.layers.{i}."
            o = f"layers.{i}."
            attn = p + "self_attn."
            out[o + "attention.wqkv.weight"] = torch.cat(
                [hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"]]
            )
            if args.qkv_bias:
                out[o + "attention.wqkv.bias"] = torch.cat(
                    [hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"]]
                )
            out[o + "attention.wo.weight"] = hf[attn + "o_proj.weight"]
            mlp = p + "mlp."
            out[o + "feed_forward.w_gate_up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
            out[o + "feed_forward.w_down.weight"] = hf[mlp + "down_proj.weight"]
            if args.mlp_bias:
                out[o + "feed_forward.w_gate_up.bias"] = torch.cat([hf[mlp + "gate_proj.bias"], hf[mlp + "up_proj.bias"]])
                out[o + "feed_forward.w_down.bias"] = hf[mlp + "down_proj.bias"]
            out[o + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
            out[o + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        return out
