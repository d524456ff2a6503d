"""Loading: the checkpoint named by the config, its weights in the asked format, tokenizer, device, EOS ids."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.capability import choose_paths
from sinkserve.engine.models import load_model
from sinkserve.engine.weights import resolve_checkpoint
from sinkserve.errors import InvalidArgument

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {name!r} asked for, but CUDA is not available")
    return device


def eos_ids(hf_config: dict, tokenizer, checkpoint: Path | None = None) -> frozenset[int]:
    """Every id that ends a reply: config.json's, the tokenizer's and generation_config.json's."""
    ids: set[int] = set()
    values = [hf_config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)]
    path = checkpoint / "generation_config.json" if checkpoint is not None else None
    if path is not None and path.is_file():
        values.append(json.loads(path.read_text()).get("eos_token_id"))
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


# What load_engine reports to its `on_stage` callback, in order (a stage may be skipped).
LOAD_STAGES = ("finding the checkpoint", "reading the weights", "building the model", "packing low-bit weights",
               "loading the tokenizer", "allocating the KV slab")


def load_engine(config: EngineConfig, on_stage: Callable[[str], None] | None = None, tensor_parallel: int = 1,
                oversubscribe: bool = False, vocab_parallel: bool = True, launcher=None):
    """Load the model and tokenizer named by `config` and build an engine around them. `on_stage` is told each
    of LOAD_STAGES as it begins (a CLI shows progress with it). With tensor_parallel N > 1 the model is split over
    N local shards (engine/shards.py): this process is rank 0 and runs the engine, the others are spawned
    processes that `engine.close()` stops; `oversubscribe` lets N exceed the CPUs here."""
    from transformers import AutoTokenizer

    from sinkserve.engine.engine import Engine

    stage = on_stage or (lambda _: None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stage(LOAD_STAGES[0])
    device = resolve_device(config.device)
    # Shards run dense weights (the low-bit kernels are not split): auto means dense there.
    weights = "dense" if tensor_parallel > 1 and config.weights == "auto" else config.weights
    paths = choose_paths(config.dtype, weights, config.packed_max_rows, device, threads=config.num_threads)
    if device.type == "cpu":
        torch.set_num_threads(paths.threads)
    log.info("%s", paths.line())
    config = config.model_copy(update={"dtype": paths.dtype, "weights": paths.weights,
                                       "packed_max_rows": paths.packed_max_rows})
    checkpoint = resolve_checkpoint(config.model)
    if tensor_parallel > 1:
        return _load_sharded(config, checkpoint, device, tensor_parallel, oversubscribe, vocab_parallel, launcher,
                             paths)
    model, hf_config = load_model(checkpoint, DTYPES[paths.dtype], device, paths.weights, paths.packed_max_rows,
                                  on_stage=stage)
    stage(LOAD_STAGES[4])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    stage(LOAD_STAGES[5])
    return Engine(config, model, tokenizer, eos_ids(hf_config, tokenizer, checkpoint), model_name=str(config.model),
                  paths=paths)


def _load_sharded(config: EngineConfig, checkpoint: Path, device: torch.device, world: int, oversubscribe: bool,
                  vocab_parallel: bool, launcher=None, paths=None):
    from transformers import AutoTokenizer

    from sinkserve.engine import shards
    from sinkserve.engine.engine import Engine

    if config.weights != "dense":
        raise InvalidArgument(f"tensor_parallel > 1 runs dense weights; weights={config.weights} needs "
                              "tensor_parallel 1")
    model, hf_config, launcher = shards.load_sharded_model(checkpoint, world, config.dtype, device,
                                                           paths.threads if paths else config.num_threads,
                                                           oversubscribe, vocab_parallel, launcher)

    def make_runner(model, geometry, policy, max_chunk):
        return shards.ShardedRunner(model, geometry, policy, max_chunk, world, launcher)

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        return Engine(config, model, tokenizer, eos_ids(hf_config, tokenizer, checkpoint),
                      model_name=str(config.model), paths=paths, make_runner=make_runner)
    except BaseException:
        shards.stop_all(launcher)
        raise
