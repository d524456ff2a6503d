"""GPT-NeoX family (Pythia): fused per-head QKV, partial rotary, LayerNorm, optional parallel residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.attention import StepBatch, sink_window_attention
from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.models.common import partial_rotary_factor, rope_settings

HF_ARCHITECTURES = ("GPTNeoXForCausalLM",)

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    rot_dim: int
    max_context: int
    parallel_residual: bool
    attention_bias: bool
    activation: str
    tie_embeddings: bool

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg["hidden_size"] // n_heads
        theta, scaling = rope_settings(cfg, theta_key="rotary_emb_base")
        activation = cfg.get("hidden_act", "gelu")
        if activation not in _ACTIVATIONS:
            from sinkserve.errors import UnsupportedModel

            raise UnsupportedModel(f"GPT-NeoX activation {activation!r} is not supported")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("layer_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            rot_dim=int(head_dim * partial_rotary_factor(cfg)),
            max_context=cfg.get("max_position_embeddings", 2048),
            parallel_residual=bool(cfg.get("use_parallel_residual", True)),
            attention_bias=bool(cfg.get("attention_bias", True)),
            activation=activation,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, args.n_heads, args.head_dim
        inner = args.n_heads * args.head_dim  # = dim, or a tensor-parallel shard's heads
        self.query_key_value = nn.Linear(args.dim, 3 * inner, bias=args.attention_bias)
        self.dense = nn.Linear(inner, args.dim, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        # NeoX lays out q, k, v interleaved per head: [heads, 3 * head_dim].
        qkv = self.query_key_value(x).view(n, self.n_heads, 3 * self.head_dim)
        q, k, v = qkv.chunk(3, dim=-1)
        out = sink_window_attention(q, k, v.contiguous(), slab, self.layer, batch)
        return self.dense(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.dim, args.intermediate_size)
        self.dense_4h_to_h = nn.Linear(args.intermediate_size, args.dim)
        self.act = _ACTIVATIONS[args.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.parallel = args.parallel_residual
        self.input_layernorm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args, layer)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), slab, batch)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_in = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.final_layer_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.embed_out = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.embed_out.weight = self.embed_in.weight

    def forward(self, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        x = self.embed_in(batch.token_ids)
        for layer in self.layers:
            x = layer(x, slab, batch)
        return self.embed_out(self.final_layer_norm(x.index_select(0, batch.logits_index)))

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in hf.items():
            if name.startswith("gpt_neox."):
                name = name[len("gpt_neox.") :]
            if name.endswith((".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")):
                continue  # buffers of old checkpoints, not parameters
            out[name] = tensor
        if args.tie_embeddings:
            out["embed_out.weight"] = out["embed_in.weight"]
        return out
