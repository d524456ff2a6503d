"""Qwen3 family (dense Qwen3): the Llama layout plus a per-head RMSNorm on q and k, applied before RoPE.

GQA, SwiGLU, RMSNorm, optional tied embeddings, head_dim from the config (Qwen3 sets it explicitly, it need
not be hidden_size / heads). q/k norms act on each head's raw projection; sink_window_attention then rotates
the normalised keys inside the cache exactly as for Llama, so eviction and cache positions need nothing new.

Tensor parallelism: wqkv and w_gate_up split column-wise (by whole heads for q/k/v, kv heads divided over
ranks, replicated when there are fewer kv heads than ranks), wo and w_down row-wise with one all-reduce each;
q_norm/k_norm act per head and are replicated on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sinkserve.engine.attention import StepBatch, sink_window_attention
from sinkserve.engine.kv_cache import KVSlab
from sinkserve.engine.models import llama
from sinkserve.engine.models.llama import RMSNorm
from sinkserve.errors import UnsupportedModel

HF_ARCHITECTURES = ("Qwen3ForCausalLM",)


@dataclass
class ModelArgs(llama.ModelArgs):
    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
            raise UnsupportedModel("Qwen3 with sliding-window layers is not supported (the engine's cache is the window)")
        cfg = {"attention_bias": False, **cfg}
        return super().from_hf(cfg)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x: torch.Tensor, slab: KVSlab, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.reshape(n, self.n_heads, self.head_dim))
        k = self.k_norm(k.reshape(n, self.n_kv_heads, self.head_dim))
        v = v.reshape(n, self.n_kv_heads, self.head_dim)
        out = sink_window_attention(q, k, v, slab, self.layer, batch)
        return self.wo(out.view(n, q_size))


class Block(llama.Block):
    attention_cls = Attention


class Transformer(llama.Transformer):
    block_cls = Block

    @staticmethod
    def convert_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        out = llama.Transformer.convert_hf_state_dict(hf, args)
        for i in range(args.n_layers):
            attn = f"model.layers.{i}.self_attn."
            out[f"layers.{i}.attention.q_norm.weight"] = hf[attn + "q_norm.weight"]
            out[f"layers.{i}.attention.k_norm.weight"] = hf[attn + "k_norm.weight"]
        return out
