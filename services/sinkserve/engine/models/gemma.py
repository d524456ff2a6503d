"""Gemma 2 and Gemma 3 (text) family: Gemma2ForCausalLM, Gemma3ForCausalLM.

What differs from Llama, each matched to HF's forward:
- RMSNorm scales by (1 + weight), computed in float32 and rounded to the input dtype only at the end;
- the embedding is multiplied by sqrt(hidden_size), that constant first rounded to the model dtype (as HF does);
- sandwich norms: input / post_attention around attention, pre_feedforward / post_feedforward around the MLP;
- GeGLU MLP with the tanh-approximate GELU (`gelu_pytorch_tanh`);
- softmax scale query_pre_attn_scalar**-0.5 (not head_dim**-0.5): the query is multiplied by
  sqrt(head_dim / query_pre_attn_scalar), and the engine's own head_dim**-0.5 makes up the rest;
- Gemma 2: attention logits capped by tanh (attn_logit_softcapping) before the mask, final logits capped too
  (final_logit_softcapping); Gemma 3 sets neither by default, and either is honoured when set;
- Gemma 3: per-head RMSNorm on q and k before RoPE; sliding layers rotate with rope_local_base_freq
  (`rope_parameters["sliding_attention"]`), global layers with rope_theta and rope_scaling if any;
- tied embeddings by default.

Local and global layers (`layer_types`, `sliding_window`): a local layer's query sees the keys fewer than
`sliding_window` text positions back, itself included (HF's sliding-window mask), intersected with what the
sink-window cache holds (step_inputs.LocalLayers). The sink rule per layer kind:
- global layers: the attention sinks + the rolling window, as every other family;
- local layers: no sinks, as HF's sliding layers: sink entries are seen only while within `sliding_window`
  text positions (so, before any eviction, exactly HF's mask). With sliding_window < window a local layer sees
  the last sliding_window tokens of the ring; with sliding_window >= window, the whole ring once the sinks
  are that far back.
Both kinds store keys in the same slab with the same frames; Gemma 3's local layers carry their own rotary
tables, and KVSlab.rebase re-rotates each layer with its own frequencies.

Tensor parallelism: not partitioned (engine/shards.py refuses it at start, naming the families that split).
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
from sinkserve.errors import UnsupportedModel

HF_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


@dataclass
class ModelArgs(llama.ModelArgs):
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qk_norm: bool = False  # Gemma 3
    gelu_approximate: str = "tanh"
    local_window: int | None = None  # HF's sliding_window; None: every layer global
    local_layers: tuple[int, ...] = ()
    local_rope_theta: float = 10000.0
    local_rope_scaling: dict | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        gemma3 = cfg.get("model_type") == "gemma3_text" or "Gemma3ForCausalLM" in (cfg.get("architectures") or [])
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModel("Gemma with bidirectional attention is not a causal LM the engine can serve")
        activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in _GELU:
            raise UnsupportedModel(f"Gemma activation {activation!r} is not supported (supported: {', '.join(_GELU)})")
        n_heads, n_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        (theta, scaling), (local_theta, local_scaling) = _rope_per_kind(cfg, gemma3)
        window = cfg.get("sliding_window")
        kinds = cfg.get("layer_types") or [  # older configs: a repeating pattern (Gemma 2 alternates)
            "sliding_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6 if gemma3 else 2)) else
            "full_attention" for i in range(n_layers)
        ]
        unknown = set(kinds) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModel(f"Gemma layer types {sorted(unknown)} are not supported")
        local_layers = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention") if window else ()
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_context=cfg.get("max_position_embeddings", 8192),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=bias,
            mlp_bias=False,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
            attn_softcap=cfg.get("attn_logit_softcapping"),
            final_softcap=cfg.get("final_logit_softcapping"),
            qk_norm=gemma3,
            gelu_approximate=_GELU[activation],
            local_window=int(window) if local_layers else None,
            local_layers=local_layers,
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
        )


def _rope_per_kind(cfg: dict, gemma3: bool) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((theta, scaling) of global layers, (theta, scaling) of local layers). Gemma 2 rotates both alike;
    Gemma 3 keeps one rope_parameters entry per layer type (transformers >= 5) or, in older configs,
    rope_theta + rope_scaling for global layers and rope_local_base_freq for local ones."""
    if not gemma3:
        both = rope_settings(cfg)
        return both, both
    params = cfg.get("rope_parameters") or {}

    def kind(p: dict, default_theta: float) -> tuple[float, dict | None]:
        scaled = p.get("rope_type", p.get("type", "default")) != "default"
        return float(p.get("rope_theta", default_theta)), (p if scaled else None)

    if "full_attention" in params or "sliding_attention" in params:
        return (kind(params.get("full_attention") or {}, 1_000_000.0),
                kind(params.get("sliding_attention") or {}, 10_000.0))
    scaling = cfg.get("rope_scaling")
    return ((float(cfg.get("rope_theta", 1_000_000.0)), scaling or None),
            (float(cfg.get("rope_local_base_freq", 10_000.0)), None))


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in float32, rounded to x's dtype at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.local = layer in args.local_layers
        self.softcap = args.attn_softcap
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.qkv_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        # The engine scales scores by head_dim**-0.5; this makes it query_pre_attn_scalar**-0.5.
        self.q_scale = (args.head_dim / args.query_pre_attn_scalar) ** 0.5

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(n, self.n_heads, self.head_dim)
        k = k.reshape(n, self.n_kv_heads, self.head_dim)
        v = v.reshape(n, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        out = sink_window_attention(q, k, v, slab, self.layer, batch, local=self.local, softcap=self.softcap)
        return self.wo(out.reshape(n, q_size))


class FeedForward(nn.Module):
    """GeGLU: down(gelu(gate) * up)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden = args.intermediate_size
        self.approximate = args.gelu_approximate
        self.w_gate_up = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # fused gate + up
        self.w_down = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.hidden, dim=-1)
        return self.w_down(F.gelu(gate, approximate=self.approximate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.post_attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), slab, batch))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        """Runs the step's tokens through the model; returns logits for batch.logits_index only."""
        x = self.tok_embeddings(batch.token_ids)
        # HF keeps sqrt(hidden) as a float32 tensor cast to the weights' dtype (55.4256 becomes 55.5 in bf16).
        x = x * torch.tensor(self.args.dim**0.5, dtype=torch.float32).to(x.dtype)
        for layer in self.layers:
            x = layer(x, slab, batch)
        logits = self.output(self.norm(x.index_select(0, batch.logits_index)))
        cap = self.args.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """HF parameter names -> ours (q/k/v and gate/up fused)."""
        out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
        out["output.weight"] = hf["model.embed_tokens.weight"] if args.tie_embeddings else hf["lm_head.weight"]
        for i in range(args.n_layers):
            p, o = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            out[o + "attention.wqkv.weight"] = torch.cat(
                [hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"]])
            out[o + "attention.wo.weight"] = hf[attn + "o_proj.weight"]
            if args.qkv_bias:
                out[o + "attention.wqkv.bias"] = torch.cat(
                    [hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"]])
                out[o + "attention.wo.bias"] = hf[attn + "o_proj.bias"]
            if args.qk_norm:
                out[o + "attention.q_norm.weight"] = hf[attn + "q_norm.weight"]
                out[o + "attention.k_norm.weight"] = hf[attn + "k_norm.weight"]
            out[o + "feed_forward.w_gate_up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
            out[o + "feed_forward.w_down.weight"] = hf[mlp + "down_proj.weight"]
            out[o + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
            out[o + "post_attention_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[o + "ffn_norm.weight"] = hf[p + "pre_feedforward_layernorm.weight"]
            out[o + "post_ffn_norm.weight"] = hf[p + "post_feedforward_layernorm.weight"]
        return out
