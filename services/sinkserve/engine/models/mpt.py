"""MPT family (MosaicML MPT-7B/30B and their chat/instruct models): ALiBi instead of rotary, fused Wqkv, GELU
MLP of `expansion_ratio * d_model`, LayerNorm without bias, no linear biases, embeddings tied to the head.

ALiBi under StreamingLLM (paper §3.2): the bias is -slope_h * distance in CACHE positions, contiguous over
sinks + window, not the distance in the original text. The module only states the slopes (`ModelArgs.alibi_slopes`);
the step builder computes each query's cache distances and attention adds the bias (step_inputs.py,
attention.py). Keys are stored unrotated (rot_dim 0), so the cache and window frames coincide.

Config, as MosaicML's own code reads it (HF's MptForCausalLM, the test reference, implements a subset):
- attn_config.alibi must be true (learned position embeddings are not implemented); alibi_bias_max sets the
  slopes 2^(-alibi_bias_max * i / n) (HF always uses 8; the slopes here follow the config);
- clip_qkv clamps the fused q/k/v; softmax_scale overrides 1/sqrt(head_dim);
- logit_scale multiplies the logits (a number or "inv_sqrt_d_model"; HF ignores it);
- refused: qk_ln, multi-query / grouped attention, prefix_lm, no_bias=False, non-LayerNorm norms, GLU FFNs.

Tensor parallelism: not partitioned (engine/shards.py refuses MptForCausalLM, naming the families that split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkserve.engine.attention import StepBatch, sink_window_attention
from sinkserve.engine.kv_cache import KVSlab
from sinkserve.errors import UnsupportedModel

HF_ARCHITECTURES = ("MptForCausalLM",)

_NORMS = ("low_precision_layernorm", "layernorm")  # the same LayerNorm; "low precision" is an autocast detail


def alibi_slopes(n_heads: int, bias_max: float) -> torch.Tensor:
    """MPT's per-head slopes: for n a power of two, 2^(-bias_max * i / n), i = 1..n; otherwise the slopes of the
    next power of two, odd ones first, cut to n."""
    power = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-torch.arange(1, power + 1, dtype=torch.float64) * (bias_max / power))
    if power != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.float()


def _refuse(what: str) -> None:
    raise UnsupportedModel(f"MPT with {what} is not supported")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_context: int
    tie_embeddings: bool
    alibi_bias_max: float
    clip_qkv: float | None
    softmax_scale: float | None
    logit_scale: float | None

    # no rotary: the rope tables are empty and keys are stored as they are
    rot_dim = 0
    rope_theta = 10000.0
    rope_scaling = None

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def alibi_slopes(self) -> torch.Tensor:
        return alibi_slopes(self.n_heads, self.alibi_bias_max)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        attn = cfg.get("attn_config") or {}
        if not attn.get("alibi", True):
            _refuse("alibi=False (learned position embeddings)")
        if attn.get("qk_ln"):
            _refuse("qk_ln=True")
        if attn.get("attn_type", "multihead_attention") != "multihead_attention":
            _refuse(f"attn_type {attn['attn_type']!r} (only multihead_attention)")
        kv_heads = attn.get("kv_n_heads")
        if kv_heads is not None and kv_heads != cfg["n_heads"]:
            _refuse(f"kv_n_heads={kv_heads} (grouped attention)")
        if attn.get("prefix_lm"):
            _refuse("prefix_lm=True")  # bidirectional prefixes do not fit a causal streaming cache
        if not cfg.get("no_bias", True):
            _refuse("no_bias=False (linear and norm biases)")
        if cfg.get("norm_type", "low_precision_layernorm") not in _NORMS:
            _refuse(f"norm_type {cfg['norm_type']!r} (only LayerNorm)")
        ffn = cfg.get("ffn_config") or {}
        if ffn.get("ffn_type", "mptmlp") != "mptmlp" or ffn.get("ffn_act_fn") not in (None, {"name": "gelu"}):
            _refuse(f"ffn_config {ffn!r} (only the GELU mptmlp)")
        dim, n_heads = cfg["d_model"], cfg["n_heads"]
        logit_scale = cfg.get("logit_scale")
        if logit_scale == "inv_sqrt_d_model":
            logit_scale = dim**-0.5
        elif isinstance(logit_scale, str):
            _refuse(f"logit_scale {logit_scale!r}")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["n_layers"],
            n_heads=n_heads,
            head_dim=dim // n_heads,
            intermediate_size=int(cfg.get("expansion_ratio", 4) * dim),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            max_context=cfg.get("max_seq_len", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
            clip_qkv=attn.get("clip_qkv"),
            softmax_scale=attn.get("softmax_scale"),
            logit_scale=None if logit_scale is None else float(logit_scale),
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, args.n_heads, args.head_dim
        self.clip_qkv = args.clip_qkv
        # attention scales by 1/sqrt(head_dim); a configured softmax_scale rides on the query instead
        self.query_scale = None if args.softmax_scale is None else args.softmax_scale * args.head_dim**0.5
        inner = args.n_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, args.dim, bias=False)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.view(n, 3, self.n_heads, self.head_dim).unbind(1)
        if self.query_scale is not None:
            q = q * self.query_scale
        out = sink_window_attention(q, k, v, slab, self.layer, batch)
        return self.wo(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps, bias=False)
        self.attention = Attention(args, layer)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps, bias=False)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), slab, batch)
        return x + self.mlp(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps, bias=False)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        x = self.tok_embeddings(batch.token_ids)
        for layer in self.layers:
            x = layer(x, slab, batch)
        logits = self.output(self.norm(x.index_select(0, batch.logits_index)))
        return logits if self.args.logit_scale is None else logits * self.args.logit_scale

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        hf = {name.removeprefix("transformer."): t for name, t in hf.items()}
        if any(name.endswith((".q_ln.weight", ".k_ln.weight")) for name in hf):
            _refuse("q_ln / k_ln weights (qk_ln)")
        out = {"tok_embeddings.weight": hf["wte.weight"], "norm.weight": hf["norm_f.weight"]}
        out["output.weight"] = hf["wte.weight"] if args.tie_embeddings else hf["lm_head.weight"]
        for i in range(args.n_layers):
            p, o = f"blocks.{i}.", f"layers.{i}."
            out[o + "attention_norm.weight"] = hf[p + "norm_1.weight"]
            out[o + "attention.wqkv.weight"] = hf[p + "attn.Wqkv.weight"]
            out[o + "attention.wo.weight"] = hf[p + "attn.out_proj.weight"]
            out[o + "ffn_norm.weight"] = hf[p + "norm_2.weight"]
            out[o + "mlp.up.weight"] = hf[p + "ffn.up_proj.weight"]
            out[o + "mlp.down.weight"] = hf[p + "ffn.down_proj.weight"]
        return out
