"""A short load run with faults (issue 11): replicas killed with SIGKILL on a schedule and redis-server killed
once, under real Locust users on the local stack (tiny random-weight model). No acknowledged turn is lost, each
fault is put right and recorded with its recovery, and the report says so with a plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USERS, DURATION_S, REPLICAS = 20, 75, 2
KILL_EVERY_S, REDIS_AT_S = 25, 40


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_faults_lose_no_acknowledged_turn_and_each_recovers(tmp_path):
    command = [
        sys.executable, "-m", "loadtest.run",
        "--users", str(USERS), "--spawn-rate", "20", "--duration", str(DURATION_S),
        "--replicas", str(REPLICAS), "--slots", "16", "--model", "tiny",
        "--think-min", "1", "--think-max", "3", "--max-tokens", "8", "--turn-timeout", "60",
        "--kill-replica-every", str(KILL_EVERY_S), "--restart-redis-at", str(REDIS_AT_S),
        "--no-engine-baseline", "--name", "faults",
        "--results-dir", str(tmp_path / "results"), "--docs-dir", str(tmp_path / "docs"),
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((tmp_path / "docs" / "loadtest.json").read_text())["runs"]["faults"]
    step = run["headline"]
    assert step["lost_acknowledged_turns"] == 0
    assert step["turns"] > 0
    kinds = [fault["kind"] for fault in step["faults"]]
    assert sorted(kinds) == ["redis", "replica", "replica"]
    for fault in step["faults"]:
        assert "error" not in fault, fault
        if fault["kind"] == "replica":
            assert fault.get("replaced_s") is not None, f"no replacement replica reported: {fault}"
        else:
            assert fault.get("restarted_s") is not None, f"redis-server did not come back: {fault}"
        assert fault["recovered_s"] is not None, f"turns/s never came back after {fault}"
    md = (tmp_path / "docs" / "loadtest.md").read_text()
    assert "### Faults" in md and "lost acknowledged turns: 0" in md
    assert any(image.endswith("_faults_u20.png") for image in run["images"])
    assert (tmp_path / "docs" / "img" / "loadtest_faults_faults_u20.png").stat().st_size > 0
