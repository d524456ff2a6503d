"""The `sinkserve` command line.

Engine commands (`model`, `generate`, `ppl`) live here; the serving commands (`up`, `gateway`, `tenant`,
`chat`) are registered by `sinkserve.cli_serving`. Heavy imports (torch, Ray) happen inside commands so
that `sinkserve chat` and `sinkserve tenant` start fast and never load torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from sinkserve.config import BUNDLED_MODEL, CachePolicy, DType, EngineConfig

app = typer.Typer(
    name="sinkserve",
    help="Endless multi-tenant chat on bounded memory (StreamingLLM + Ray Serve + gRPC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The bundled default model.", no_args_is_help=True)
app.add_typer(model_app, name="model")

WINDOW_HELP = (
    "recent KV entries kept per session, the token being processed included: each token attends to at "
    "most sinks + window keys (the official streaming-llm code's recent_size is window - 1)"
)
WEIGHTS_HELP = "dense | int4 (4-bit weights for decode on CPU, the bundled GGUF's own blocks; needs --dtype bfloat16)"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _engine_config(**overrides) -> EngineConfig:
    from pydantic import ValidationError

    try:
        return EngineConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        details = "; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in err.errors()
        )
        _fail(details)
        raise  # unreachable


@model_app.command("prepare")
def model_prepare(
    force: bool = typer.Option(False, help="convert again even if the cache has it"),
) -> None:
    """Convert the bundled SmolLM2 GGUF to safetensors in the cache directory (once; idempotent)."""
    from sinkserve.engine.weights import ModelNotFoundError, prepare_bundled_model

    try:
        path = prepare_bundled_model(force=force)
    except ModelNotFoundError as err:
        _fail(str(err))
    typer.echo(f"{BUNDLED_MODEL}: {path}")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the user message"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, min=0, help="0 = off"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    repetition_penalty: float = typer.Option(1.0, min=0.0),
    seed: Optional[int] = typer.Option(None),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    model: str = typer.Option(BUNDLED_MODEL, help="bundled model name or checkpoint directory"),
    sinks: int = typer.Option(4, help="attention-sink entries"),
    window: int = typer.Option(1020, help=WINDOW_HELP),
    policy: str = typer.Option("streaming", help="streaming | window | recompute | dense"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    weights: str = typer.Option("dense", help=WEIGHTS_HELP),
    device: str = typer.Option("auto"),
) -> None:
    """Stream a reply to one message to the terminal."""
    from sinkserve.engine import EngineError, SamplingParams, load_engine

    cfg = _engine_config(
        model=model, sinks=sinks, window=window, policy=policy, dtype=dtype, weights=weights, device=device,
        max_sessions=1,
    )
    try:
        engine = load_engine(cfg)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=list(stop),
        )
        sid = engine.open_session(system_prompt=system)
        final = None
        for out in engine.chat(sid, prompt, params):
            sys.stdout.write(out.text)
            sys.stdout.flush()
            final = out
        sys.stdout.write("\n")
        if final is not None:
            typer.secho(
                f"[{final.finish_reason}; {final.completion_tokens} tokens]", fg=typer.colors.BRIGHT_BLACK, err=True
            )
    except EngineError as err:
        _fail(str(err))


@app.command()
def ppl(
    text: Path = typer.Option(..., "--text", exists=True, dir_okay=False, readable=True, help="UTF-8 text file"),
    tokens: int = typer.Option(2000, "--tokens", min=2, help="evaluate the first N tokens"),
    model: str = typer.Option(BUNDLED_MODEL, help="bundled model name or checkpoint directory"),
    sinks: int = typer.Option(4, help="attention-sink entries"),
    window: int = typer.Option(252, help=WINDOW_HELP),
    policy: str = typer.Option("streaming", help="streaming | window | recompute | dense"),
    dtype: str = typer.Option("float32"),
    weights: str = typer.Option("dense", help=WEIGHTS_HELP),
    device: str = typer.Option("auto"),
    chunk: int = typer.Option(
        256, min=1, help="tokens fed per forward; every token still sees exactly the cache state before it"
    ),
    max_context: Optional[int] = typer.Option(None, help="dense only: cache capacity (default: model context)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    progress: bool = typer.Option(True, help="progress bar on stderr"),
) -> None:
    """Perplexity of a long text, token by token through the cache (the paper's eval_long_ppl)."""
    from sinkserve.engine import EngineError, load_engine
    from sinkserve.engine.ppl import evaluate_ppl

    cfg = _engine_config(
        model=model,
        sinks=sinks,
        window=window,
        policy=policy,
        dtype=dtype,
        weights=weights,
        device=device,
        max_sessions=8 if policy == "recompute" else 1,  # recompute scores 8 positions per forward
        prefill_chunk=chunk,
        max_context=max_context,
    )
    content = text.read_text(encoding="utf-8", errors="replace")
    try:
        engine = load_engine(cfg)
        result = evaluate_ppl(engine, content, max_tokens=tokens, chunk=chunk, progress=progress)
    except EngineError as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        for key, value in result.as_dict().items():
            typer.echo(f"{key:>18}: {value}")


def _register_optional(module: str) -> None:
    # Command groups owned by other parts of the tree register themselves on import.
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        return
    mod.register(app)


_register_optional("sinkserve.cli_serving")
_register_optional("sinkserve.cli_bench")

if __name__ == "__main__":
    app()
