"""A short load run over HTTP: `python -m loadtest.run --protocol http` (the local stack with its HTTP API on,
tiny random-weight model, a few Locust users chatting through the Responses API with SSE) and its report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USERS, DURATION_S = 4, 20


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_http_users_chat_endlessly_with_the_grpc_users_metrics(tmp_path):
    command = [
        sys.executable, "-m", "loadtest.run", "--protocol", "http",
        "--users", str(USERS), "--spawn-rate", "4", "--duration", str(DURATION_S),
        "--replicas", "1", "--slots", "8", "--model", "tiny", "--window", "60",
        "--think-min", "0.2", "--think-max", "1", "--max-tokens", "8", "--turn-timeout", "60",
        "--no-engine-baseline", "--name", "http-short",
        "--results-dir", str(tmp_path / "results"), "--docs-dir", str(tmp_path / "docs"),
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, f"load run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    run = json.loads((tmp_path / "docs" / "loadtest.json").read_text())["runs"]["http-short"]
    assert run["config"]["protocol"] == "http"
    head = run["headline"]
    assert head["sessions_created"] == USERS and head["session_create_errors"] == {}
    assert head["failed_turns"] == 0, head["failures_by_code"]
    assert head["turns"] > USERS and head["turns_per_session_min_max"][1] > 1  # each chat went on, never reset
    assert set(head["session_checks"]) == {"match"}
    for key in ("ttft_p50_ms", "itl_p50_ms", "turn_p99_ms"):
        assert head[key] is not None and head[key] >= 0, key
    with (tmp_path / "results" / "locust_stats.csv").open() as stats:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(stats)}
    for kind in ("TTFT", "ITL", "TURN"):
        assert int(rows[(kind, "SendMessage")]["Request Count"]) > 0, kind
    assert int(rows[("SESSION", "CreateSession")]["Failure Count"]) == 0
    assert "OpenAI-compatible HTTP API" in (tmp_path / "docs" / "loadtest.md").read_text()
