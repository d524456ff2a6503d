"""The `sinkserve` command line.

Engine commands (`model`, `generate`, `ppl`) live here; the serving commands (`up`, `gateway`, `tenant`) are
registered by `sinkserve.cli_serving`, the client ones (`chat`, `session`) by `sinkserve.cli_chat`. Heavy
imports (torch, Ray) happen inside commands so that `sinkserve chat` and `sinkserve tenant` start fast and never
load torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from sinkserve.cli_flags import ConfigError, ConfigFlags, GivenFlags
from sinkserve.config import BUNDLED_MODEL, EngineConfig
from sinkserve.errors import InvalidArgument, SinkServeError
from sinkserve.protocol import GenerationParams

GENERATION = GenerationParams()  # the sampling defaults generate's help shows

app = typer.Typer(
    name="sinkserve",
    help="Endless multi-tenant chat on bounded memory (StreamingLLM + Ray Serve + gRPC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The bundled default model.", no_args_is_help=True)
app.add_typer(model_app, name="model")

# The engine settings of the one-session commands (generate, ppl), as flags derived from EngineConfig. `up` takes
# every engine field; these leave out what a single session has no use for (slots, parking) and the default
# sampling seed (generate has its own --seed). --tensor-parallel is the replica's shard count, run here as local
# processes.
MODEL_FLAGS = ConfigFlags.of(
    "engine",
    ("model", "dtype", "weights", "packed_max_rows", "device", "policy", "sinks", "window", "prefill_chunk",
     "max_context", "num_threads"),
) + ConfigFlags.of("replica", (("tensor_parallel", "--tensor-parallel"),))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def model_settings(flags: GivenFlags, **fixed):
    """The settings of a one-session command: defaults, then SINKSERVE_* env, then the flags the user gave, then
    what the command itself fixes in the engine section (`fixed`). Exits 2 naming the flag when a value is
    refused."""
    from sinkserve.config import Settings

    try:
        return flags.build(lambda: Settings(engine={**flags.section("engine"), **fixed},
                                            replica=flags.section("replica")))
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable


def engine_config(flags: GivenFlags, **fixed) -> EngineConfig:
    return model_settings(flags, **fixed).engine


def load_engine_showing_progress(settings: Settings):
    """load_engine showing its progress on stderr (imports, checkpoint, weights, tokenizer: 15-40 s on two CPU
    cores): a bar on a terminal, a line per stage otherwise. A model that is not there or does not load is a
    clear error, not a traceback. The engine runs on replica.tensor_parallel local shards (rank 0 is this
    process)."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    cfg, replica = settings.engine, settings.replica
    name = Path(cfg.model).name or cfg.model
    console = Console(stderr=True)
    stages = ["importing torch and transformers"]
    with contextlib.ExitStack() as stack:
        progress = None
        if console.is_terminal:
            progress = stack.enter_context(Progress(
                SpinnerColumn(), TextColumn(f"loading {name}: {{task.description}}"), BarColumn(),
                TimeElapsedColumn(), console=console, transient=True))
            task = progress.add_task(stages[0], total=7)  # the import, then loader.LOAD_STAGES

        def on_stage(stage: str) -> None:
            if progress is not None:
                progress.update(task, description=stage, completed=stages.index(stage) if stage in stages else 0)
            else:
                typer.secho(f"loading {name}: {stage} ...", fg=typer.colors.BRIGHT_BLACK, err=True)

        on_stage(stages[0])
        from sinkserve.engine import load_engine
        from sinkserve.engine.loader import LOAD_STAGES
        from sinkserve.engine.weights import ModelNotFoundError

        stages += LOAD_STAGES
        try:
            return load_engine(cfg, on_stage=on_stage, tensor_parallel=replica.tensor_parallel,
                               oversubscribe=replica.tensor_parallel_oversubscribe)
        except ModelNotFoundError as err:
            problem = str(err)
        except SinkServeError as err:
            problem = f"model {cfg.model!r}: {err.message}"
        except (OSError, ValueError, KeyError) as err:  # unreadable files, a config or tokenizer that does not load
            problem = f"model {cfg.model!r} did not load: {type(err).__name__}: {err}"
    _fail(problem)


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
@MODEL_FLAGS
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the user message"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help=f"default {GENERATION.max_tokens}"),
    temperature: Optional[float] = typer.Option(None, help=f"0 = greedy; default {GENERATION.temperature}"),
    top_k: Optional[int] = typer.Option(None, help=f"0 = off; default {GENERATION.top_k}"),
    top_p: Optional[float] = typer.Option(None, help=f"default {GENERATION.top_p}"),
    repetition_penalty: Optional[float] = typer.Option(None, help=f"1 = off; default {GENERATION.repetition_penalty}"),
    seed: Optional[int] = typer.Option(None, help="sampling seed (default: a random one)"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    *,
    flags: GivenFlags,
) -> None:
    """Stream a reply to one message to the terminal."""
    settings = model_settings(flags, slots=1)  # refused flags exit before anything heavy is imported
    given = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop))
    try:
        params = GenerationParams.from_fields({k: v for k, v in given.items() if v is not None and v != ()})
    except InvalidArgument as err:  # GenerationParams names the setting: name the flag
        setting = next((k for k in given if err.message.startswith(k)), None)
        _fail(f"--{setting.replace('_', '-')}: {err.message}" if setting else err.message)
    engine = load_engine_showing_progress(settings)
    try:
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
    except SinkServeError as err:
        _fail(err.message)
    finally:
        if engine is not None:
            engine.close()


@app.command()
@MODEL_FLAGS
def ppl(
    text: Path = typer.Option(..., "--text", exists=True, dir_okay=False, readable=True, help="UTF-8 text file"),
    tokens: int = typer.Option(2000, "--tokens", min=2, help="evaluate the first N tokens"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    progress: bool = typer.Option(True, help="progress bar on stderr"),
    *,
    flags: GivenFlags,
) -> None:
    """Perplexity of a long text, token by token through the cache (the paper's eval_long_ppl).

    Tokens are fed --prefill-chunk at a time; every token still sees exactly the cache state before it.
    """
    settings = model_settings(flags, slots=1)  # refused flags exit before anything heavy is imported
    chunk = settings.engine.prefill_chunk
    content = text.read_text(encoding="utf-8", errors="replace")
    engine = load_engine_showing_progress(settings)
    from sinkserve.engine.eval import evaluate_ppl

    try:
        result = evaluate_ppl(engine, content, max_tokens=tokens, chunk=chunk, progress=progress)
    except SinkServeError as err:
        _fail(err.message)
    finally:
        if engine is not None:
            engine.close()
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
_register_optional("sinkserve.cli_chat")
_register_optional("sinkserve.cli_bench")

if __name__ == "__main__":
    app()
