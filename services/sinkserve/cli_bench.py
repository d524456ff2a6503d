"""`sinkserve bench`: the same entry point as `make bench` / `python -m benchmarks.run`.

The benchmarks are the repository's top-level `benchmarks/` package, not part of the installed distribution:
they measure the checkout's code and write docs/ of the checkout. So this command needs sinkserve installed from
a source checkout in editable mode (what `make setup` does): it finds the checkout from the distribution's
metadata (pip's direct_url.json) and runs `python -m benchmarks.run` there, as `make bench` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

import typer

NO_CHECKOUT = (
    "the benchmarks need a source checkout of sinkserve installed in editable mode "
    "(`make setup`, or `pip install -e .` in the checkout); this sinkserve is installed without one"
)


def checkout_root() -> Path | None:
    """The source checkout sinkserve is installed from in editable mode, if it has the benchmarks."""
    try:
        raw = distribution("sinkserve").read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    if not raw:
        return None
    info = json.loads(raw)
    url = urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    root = Path(unquote(url.path))
    return root if (root / "benchmarks" / "run.py").is_file() else None


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
        root = checkout_root()
        if root is None:
            typer.secho(f"error: {NO_CHECKOUT}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        argv = ["--quick"] if quick else []
        if text is not None:
            argv += ["--text", str(text.resolve())]  # paths as the user meant them: the run's cwd is the checkout
        if only is not None:
            argv += ["--only", only]
        if out is not None:
            argv += ["--out", str(out.resolve())]
        # `python -m` puts its cwd (the checkout) first on the module path, as for `make bench`.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
        try:
            code = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=root, env=env).returncode
        except KeyboardInterrupt:
            code = 130
        raise typer.Exit(code)
