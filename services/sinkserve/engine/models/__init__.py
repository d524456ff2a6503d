"""Model families, one module each; `load_model` picks one from a checkpoint's config.json."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from sinkserve.engine.models import gpt_neox, llama
from sinkserve.engine.models import falcon, gemma, gpt_oss, mpt, phi3, qwen3
from sinkserve.errors import UnsupportedModel

FAMILIES: tuple[ModuleType, ...] = (llama, gpt_neox, qwen3, phi3, falcon, mpt, gemma, gpt_oss)
SUPPORTED_ARCHITECTURES = tuple(arch for family in FAMILIES for arch in family.HF_ARCHITECTURES)


def family_for(config: dict) -> ModuleType:
    for arch in config.get("architectures") or []:
        for family in FAMILIES:
            if arch in family.HF_ARCHITECTURES:
                return family
    model_type = config.get("model_type")
    for family in FAMILIES:
        if any(arch.lower().startswith(str(model_type).replace("_", "")) for arch in family.HF_ARCHITECTURES):
            return family
    raise UnsupportedModel(
        f"unsupported architecture {config.get('architectures') or model_type!r}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def load_model(
    checkpoint: Path, dtype: torch.dtype, device: torch.device, weights: str = "dense", packed_max_rows: int = 8,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Build the model for `checkpoint` (config.json + *.safetensors) in eval mode; returns (model, hf_config).
    weights="int4"/"int8" packs the linear layers (engine/quant.py) from the checkpoint's own precision. `on_stage`
    is told each stage as it begins (loader.LOAD_STAGES' names)."""
    from safetensors.torch import load_file

    stage = on_stage or (lambda _: None)
    stage("reading the weights")

    config = json.loads((checkpoint / "config.json").read_text())
    family = family_for(config)
    args = family.ModelArgs.from_hf(config)
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{checkpoint}: no *.safetensors weights (only safetensors checkpoints are loaded)")
    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        hf_state.update(load_file(file))
    stage("building the model")
    state = family.Transformer.convert_hf_state_dict(hf_state, args)
    with torch.device("meta"):
        model = family.Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True replaced the parameters; re-tie them
        output_head(model).weight = embedding(model).weight
    if weights == "int4":
        from sinkserve.engine.quant import quantize_model

        stage("packing low-bit weights")
        quantize_model(model.float(), packed_max_rows)  # from the checkpoint's values, before the cast
    elif weights == "int8":
        from sinkserve.engine.quant import quantize_model_int8

        stage("packing low-bit weights")
        quantize_model_int8(model.float(), packed_max_rows)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), config


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The family's output projection (`output` in Llama, `embed_out` in GPT-NeoX)."""
    for name in ("output", "embed_out"):
        if isinstance(getattr(model, name, None), torch.nn.Linear):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} has no output head")


def embedding(model: torch.nn.Module) -> torch.nn.Embedding:
    """The family's token embedding table (`tok_embeddings` in Llama, `embed_in` in GPT-NeoX)."""
    for name in ("tok_embeddings", "embed_in"):
        if isinstance(getattr(model, name, None), torch.nn.Embedding):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} has no embedding table")
