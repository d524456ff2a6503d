"""Falcon family (Falcon 7B/40B/180B, Falcon-RW with rotary): multi-query or grouped attention, parallel
attention + MLP, rotary, GELU MLP, LayerNorm with bias.

Variants, as HF's FalconForCausalLM reads them:
- classic 7B (`multi_query=True`, `parallel_attn=True`): one kv head, one input_layernorm feeding both the
  attention and the MLP, x + attn(ln(x)) + mlp(ln(x));
- `new_decoder_architecture=True` (40B/180B): `num_kv_heads` groups, two layernorms ln_attn / ln_mlp (or one,
  `num_ln_in_parallel_attn=1`), x + attn(ln_attn(x)) + mlp(ln_mlp(x));
- `multi_query=False` without the new architecture: one kv head per query head; with `parallel_attn=False`
  the block is sequential (input_layernorm, post_attention_layernorm).
The fused query_key_value differs by variant; convert_hf_state_dict reorders it to [all q | all k | all v]:
- new architecture: per kv group [q_0 .. q_{g-1}, k, v] (g = heads / kv heads), head_dim rows each;
- multi-query: [q heads .., k, v];
- otherwise: per head [q, k, v] interleaved.
ALiBi Falcon (`alibi=True`) is refused here: the rotary path is what this module implements.

Tensor parallelism: query_key_value (after the reorder) and dense_h_to_4h column-parallel, dense and
dense_4h_to_h row-parallel (their biases added once, after the all-reduce). Multi-query: the single kv head is
replicated on every rank (each rank computes it from the full input, so its slice of the KV slab holds the
same one head) and only the query heads are split; grouped attention splits the kv groups when they divide by
the ranks and replicates them otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.attention import StepBatch, sink_window_attention
from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.models.common import rope_settings
from sinkserve.errors import UnsupportedModel

HF_ARCHITECTURES = ("FalconForCausalLM",)

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


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
    bias: bool
    new_decoder_architecture: bool
    multi_query: bool
    parallel_attn: bool
    num_ln: int  # layernorms per block: 2 = ln_attn + ln_mlp (new architecture) or input + post_attention
    activation: str

    @property
    def rot_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        if cfg.get("alibi"):
            raise UnsupportedModel("Falcon with alibi=True is not supported by the Falcon module (rotary only)")
        dim = cfg.get("hidden_size", cfg.get("n_embed"))
        n_heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        new_arch = bool(cfg.get("new_decoder_architecture", False))
        multi_query = bool(cfg.get("multi_query", True))
        parallel = bool(cfg.get("parallel_attn", True))
        kv_heads = cfg.get("num_kv_heads", cfg.get("n_head_kv")) or n_heads
        if not new_arch and multi_query:
            kv_heads = 1
        if new_arch and not parallel:
            raise UnsupportedModel("Falcon new_decoder_architecture needs parallel_attn=True")
        num_ln = cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
        if not parallel:
            num_ln = 2
        activation = cfg.get("activation", "gelu")
        if activation not in _ACTIVATIONS:
            raise UnsupportedModel(f"Falcon activation {activation!r} is not supported")
        theta, scaling = rope_settings(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg.get("num_hidden_layers", cfg.get("n_layer")),
            n_heads=n_heads,
            n_kv_heads=kv_heads,
            head_dim=dim // n_heads,
            intermediate_size=cfg.get("ffn_hidden_size") or 4 * dim,
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_context=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            bias=bool(cfg.get("bias", False)),
            new_decoder_architecture=new_arch,
            multi_query=multi_query,
            parallel_attn=parallel,
            num_ln=num_ln,
            activation=activation,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.bias)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(n, self.n_heads, self.head_dim)
        k = k.reshape(n, self.n_kv_heads, self.head_dim)
        v = v.reshape(n, self.n_kv_heads, self.head_dim)
        out = sink_window_attention(q, k, v, slab, self.layer, batch)
        return self.wo(out.view(n, q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.dim, args.intermediate_size, bias=args.bias)
        self.dense_4h_to_h = nn.Linear(args.intermediate_size, args.dim, bias=args.bias)
        self.act = _ACTIVATIONS[args.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.parallel, self.two_norms = args.parallel_attn, args.num_ln == 2
        self.ln_attn = nn.LayerNorm(args.dim, eps=args.norm_eps)
        if self.two_norms:  # ln_mlp (parallel) or post_attention_layernorm (sequential)
            self.ln_mlp = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args, layer)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        h = self.ln_attn(x)
        attn = self.attention(h, slab, batch)
        if not self.parallel:
            x = x + attn
            return x + self.mlp(self.ln_mlp(x))
        return x + attn + self.mlp(self.ln_mlp(x) if self.two_norms else h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        x = self.tok_embeddings(batch.token_ids)
        for layer in self.layers:
            x = layer(x, slab, batch)
        return self.output(self.norm(x.index_select(0, batch.logits_index)))

    @staticmethod
    def reorder_qkv(t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
        """HF's fused query_key_value rows (weight or bias) -> [all q | all k | all v]."""
        d, rest = args.head_dim, t.shape[1:]
        if args.new_decoder_architecture:
            groups = t.reshape(args.n_kv_heads, args.n_heads // args.n_kv_heads + 2, d, *rest)
            q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
        elif args.multi_query:
            heads = t.reshape(args.n_heads + 2, d, *rest)
            q, k, v = heads[:-2], heads[-2], heads[-1]
        else:
            heads = t.reshape(args.n_heads, 3, d, *rest)
            q, k, v = heads[:, 0], heads[:, 1], heads[:, 2]
        return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        hf = {name.removeprefix("transformer."): t for name, t in hf.items()}
        out = {"tok_embeddings.weight": hf["word_embeddings.weight"], "norm.weight": hf["ln_f.weight"],
               "norm.bias": hf["ln_f.bias"]}
        out["output.weight"] = hf["word_embeddings.weight"] if args.tie_embeddings else hf["lm_head.weight"]
        if args.num_ln == 2 and args.parallel_attn:
            norms = {"ln_attn": "ln_attn", "ln_mlp": "ln_mlp"}
        elif args.num_ln == 2:
            norms = {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"}
        else:
            norms = {"ln_attn": "input_layernorm"}
        suffixes = ("weight", "bias") if args.bias else ("weight",)
        for i in range(args.n_layers):
            p, o = f"h.{i}.", f"layers.{i}."
            for suffix in suffixes:
                out[o + f"attention.wqkv.{suffix}"] = Transformer.reorder_qkv(
                    hf[p + f"self_attention.query_key_value.{suffix}"], args
                )
                out[o + f"attention.wo.{suffix}"] = hf[p + f"self_attention.dense.{suffix}"]
                out[o + f"mlp.dense_h_to_4h.{suffix}"] = hf[p + f"mlp.dense_h_to_4h.{suffix}"]
                out[o + f"mlp.dense_4h_to_h.{suffix}"] = hf[p + f"mlp.dense_4h_to_h.{suffix}"]
            for ours, theirs in norms.items():
                out[o + f"{ours}.weight"] = hf[p + f"{theirs}.weight"]
                out[o + f"{ours}.bias"] = hf[p + f"{theirs}.bias"]
        return out
