"""The tree shows the architecture: each package imports only what its layer may (DESIGN.md §3).

Every module of the package is imported in a fresh interpreter, one interpreter per layer, and the modules then
loaded are checked against the layer's rules: heavy libraries (torch, Ray, Redis, gRPC) and other parts of the
project alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "sinkserve"
HEAVY = ("torch", "transformers", "ray", "redis", "grpc")

# layer: (module prefixes in it, forbidden top-level libraries, forbidden sinkserve packages)
LAYERS = {
    "protocol and errors": (("sinkserve.protocol", "sinkserve.errors"), HEAVY + ("pydantic",),
                            ("engine", "store", "routing", "replica", "gateway", "http", "config")),
    "config": (("sinkserve.config",), HEAVY, ("engine", "store", "routing", "replica", "gateway", "http")),
    "engine": (("sinkserve.engine",), ("ray", "redis", "grpc"), ("store", "routing", "replica", "gateway", "http")),
    "store": (("sinkserve.store",), ("torch", "transformers", "ray", "grpc"),
              ("engine", "routing", "replica", "gateway", "http")),
    "placement": (("sinkserve.routing.placement",), HEAVY, ("engine", "replica", "gateway", "http")),
    # Ray Serve itself loads grpc: the routing and replica layers cannot refuse it
    "routing": (("sinkserve.routing",), ("torch", "transformers"), ("engine", "replica.server", "gateway", "http")),
    "replica": (("sinkserve.replica",), (), ("gateway", "http")),
    "gateway": (("sinkserve.gateway",), ("torch", "transformers"), ("engine", "replica.server", "replica.turns", "http")),
    "http": (("sinkserve.http",), ("torch", "transformers"), ("engine", "replica.server", "replica.turns")),
    "clients and CLI": (("sinkserve.client", "sinkserve.cli", "sinkserve.v1"), ("torch", "transformers"),
                        ("engine", "replica.server")),
}

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def all_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("sinkserve",) + path.relative_to(PACKAGE).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, (prefixes, _, _) in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or module.startswith(prefix + "_")) \
                    and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in all_modules() if m != "sinkserve" and layer_of(m) is None]
    assert not unplaced, f"modules with no layer rules: {unplaced}"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_imports_only_what_it_may(layer):
    modules = [m for m in all_modules() if layer_of(m) == layer]
    assert modules, f"layer {layer} has no modules: drop its rule"
    result = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout))
    _, libraries, packages = LAYERS[layer]
    bad_libraries = sorted(lib for lib in libraries if lib in loaded)
    bad_packages = sorted(p for p in packages if any(m == f"sinkserve.{p}" or m.startswith(f"sinkserve.{p}.")
                                                    for m in loaded))
    assert not bad_libraries, f"{layer} ({', '.join(modules)}) loads {bad_libraries}"
    assert not bad_packages, f"{layer} ({', '.join(modules)}) loads sinkserve packages {bad_packages}"
