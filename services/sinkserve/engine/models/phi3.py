"""Phi-3 family (Phi-3 / Phi-3.5 mini and medium, Phi-4-mini): the Llama block with the checkpoint's own fused
qkv_proj and gate_up_proj, optional partial rotary, and LongRoPE ("longrope", formerly "su") scaling.

LongRoPE and cache positions: HF picks `short_factor` while the sequence is at most
original_max_position_embeddings long and `long_factor` past it, and multiplies cos/sin by an attention factor
either way. Here RoPE rotates by positions inside the cache, which never exceed sinks + window. With LongRoPE
the model's context for the engine (`max_context`) is original_max_position_embeddings, so the cache can never
reach the length at which HF would switch: `short_factor` is always the right one (engine/rope.py), and a
sinks + window past it is refused with a clear error. (Using `long_factor` for a larger cache would need the
cache size where the rope tables are built.) The attention factor multiplies both the query's and the key's
rotated features; it is folded into those rows of qkv_proj at load time, so it costs nothing per step.

Tensor parallelism: qkv and gate_up column-parallel (the fused checkpoint tensors are split into their q/k/v
and gate/up parts first, then by whole heads / intermediate rows), o_proj and down_proj row-parallel with one
all-reduce each; kv heads are replicated when there are fewer of them than ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sinkserve.engine.models import llama
from sinkserve.engine.models.common import partial_rotary_factor, rope_settings
from sinkserve.engine.rope import longrope_attention_factor
from sinkserve.errors import UnsupportedModel

HF_ARCHITECTURES = ("Phi3ForCausalLM",)


@dataclass
class ModelArgs(llama.ModelArgs):
    partial_rotary: float = 1.0
    rope_attention_factor: float = 1.0

    @property
    def rot_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"Phi-3 activation {cfg['hidden_act']!r} is not supported")
        n_heads = cfg["num_attention_heads"]
        theta, scaling = rope_settings(cfg)
        max_context = cfg.get("max_position_embeddings", 4096)
        attention_factor = 1.0
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if kind in ("longrope", "su"):
            original = scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
            scaling = {**scaling, "rope_type": "longrope", "original_max_position_embeddings": original}
            attention_factor = longrope_attention_factor(scaling, max_context)
            max_context = min(max_context, int(original))  # short_factor applies to every cache (see above)
        elif scaling is not None and kind not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"Phi-3 rope scaling {kind!r} is not supported (supported: default, longrope)")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_context=max_context,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=False,
            mlp_bias=False,
            partial_rotary=partial_rotary_factor(cfg),
            rope_attention_factor=attention_factor,
        )


class Transformer(llama.Transformer):
    """The Llama module as is: wqkv holds [q | k | v], w_gate_up holds [gate | up], as Phi-3 checkpoints do."""

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
        out["output.weight"] = hf["model.embed_tokens.weight"] if args.tie_embeddings else hf["lm_head.weight"]
        q_rows, k_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        # rows of q and k that RoPE rotates (the first rot_dim features of each head)
        rotated = (torch.arange(args.head_dim) < args.rot_dim).repeat(args.n_heads + args.n_kv_heads)
        scale = torch.ones(q_rows + 2 * k_rows, dtype=torch.float64)
        scale[: q_rows + k_rows][rotated] = args.rope_attention_factor
        for i in range(args.n_layers):
            p, o = f"model.layers.{i}.", f"layers.{i}."
            qkv = hf[p + "self_attn.qkv_proj.weight"]
            if args.rope_attention_factor != 1.0:
                qkv = (qkv.double() * scale[:, None]).to(qkv.dtype)
            out[o + "attention.wqkv.weight"] = qkv
            out[o + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
            out[o + "feed_forward.w_gate_up.weight"] = hf[p + "mlp.gate_up_proj.weight"]
            out[o + "feed_forward.w_down.weight"] = hf[p + "mlp.down_proj.weight"]
            out[o + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
            out[o + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        return out
