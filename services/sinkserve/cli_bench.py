"""`sinkserve bench`: the same entry point as `make bench` / `python -m benchmarks.run`.

The benchmarks live in the repository's top-level `benchmarks/` package (they write docs/ of the checkout),
so this command works from a source checkout (the editable install `make setup` does).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def _benchmarks_main():
    repo_root = Path(__file__).resolve().parents[2]
    if (repo_root / "benchmarks" / "run.py").is_file() and str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    try:
        from benchmarks.run import main
    except ModuleNotFoundError as err:
        if err.name != "benchmarks":
            raise
        typer.secho("error: the benchmarks need a source checkout of sinkserve (benchmarks/ next to services/)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    return main


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        quick: bool = typer.Option(False, "--quick", help="small sizes: finishes in under 10 minutes"),
        text: Optional[Path] = typer.Option(None, "--text", exists=True, dir_okay=False, readable=True,
                                            help="UTF-8 text for the perplexity runs (default: pydoc topics)"),
        only: Optional[str] = typer.Option(None, "--only", help="comma-separated sections (default: all)"),
        out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: docs/ of the checkout)"),
    ) -> None:
        """Run the benchmarks; write benchmarks.md, benchmarks.json and img/*.png."""
        argv = ["--quick"] if quick else []
        if text is not None:
            argv += ["--text", str(text)]
        if only:
            argv += ["--only", only]
        if out is not None:
            argv += ["--out", str(out)]
        raise typer.Exit(_benchmarks_main()(argv))
