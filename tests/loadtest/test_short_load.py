"""A short real load run: endless-chat Locust users against the local stack (tiny random-weight model).

It runs ``python -m loadtest.run`` exactly as ``make loadtest`` does (redis-server, local Ray on 127.0.0.1,
two replicas, the gateway, Locust headless), into temporary directories, and checks the report it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USERS, DURATION_S, REPLICAS = 50, 60, 2

# Replicas park idle sessions (issue 6), so the run gets fewer KV slots than chats and must show parked
# sessions resuming. SINKSERVE_LOADTEST_PARKING=0 gives every chat a slot of its own instead.
PARKING = os.environ.get("SINKSERVE_LOADTEST_PARKING", "1") == "1"
SLOTS_PER_REPLICA = 8 if PARKING else 40


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("loadtest")
    command = [
        sys.executable, "-m", "loadtest.run",
        "--users", str(USERS), "--spawn-rate", "10", "--duration", str(DURATION_S),
        "--replicas", str(REPLICAS), "--slots", str(SLOTS_PER_REPLICA), "--model", "tiny",
        "--think-min", "1", "--think-max", "4", "--max-tokens", "12", "--turn-timeout", "90",
        "--name", "short", "--results-dir", str(out / "results"), "--docs-dir", str(out / "docs"),
        "--profile-users", str(USERS), "--profile-seconds", "4",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"load run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    docs = out / "docs"
    data = json.loads((docs / "loadtest.json").read_text())
    return {"run": data["runs"]["short"], "docs": docs, "results": out / "results"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_turn_of_every_endless_chat_succeeds(short_run):
    head = short_run["run"]["headline"]
    assert head["users"] == USERS
    assert head["sessions_created"] == USERS and head["session_create_errors"] == {}
    assert head["sessions_served"] == USERS  # every chat got at least one turn through
    assert head["turns"] > USERS  # and kept going: sessions are never reset
    assert head["failed_turns"] == 0, head["failures_by_code"]
    assert head["turns_per_session_min_max"][1] > 1
    # Each user's final GetSession shows exactly the turns it saw finish.
    assert set(head["session_checks"]) == {"match"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_report_has_latency_memory_and_plots(short_run):
    run, docs = short_run["run"], short_run["docs"]
    head = run["headline"]
    for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "turn_p99_ms"):
        assert head[key] is not None and head[key] >= 0, key
    assert head["ttft_p99_ms"] >= head["ttft_p50_ms"]
    assert head["memory"]["measured"] and head["peak_replica_rss_mb"] > 0
    assert head["replica_state"]["replicas"] == REPLICAS
    assert head["replica_state"]["total_slots"] == REPLICAS * SLOTS_PER_REPLICA
    assert (docs / "loadtest.md").read_text().count("| failed turns | 0 |") == 1
    for image in run["images"]:
        assert (docs / image).stat().st_size > 0
    results = short_run["results"]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_report.html", "replicas.csv"):
        assert (results / name).stat().st_size > 0, name


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not PARKING, reason="SINKSERVE_LOADTEST_PARKING=0: every chat has its own slot")
def test_more_chats_than_slots_resume_from_parking(short_run):
    head = short_run["run"]["headline"]
    state = head["replica_state"]
    assert head["more_sessions_than_slots"], (head["sessions_served"], state["total_slots"])
    # Idle chats gave their slots up and came back from host memory on their next turn.
    assert state["parked_and_resumed"], state["counters"]
    # Resumed sessions kept their history: no TRANSCRIPT failure and every final check matched.
    assert "TRANSCRIPT" not in head["failures_by_code"]
    assert set(head["session_checks"]) == {"match"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_report_names_the_setup_and_says_where_the_time_goes(short_run):
    """The new sections render from a real run: model line with dtype and weights, the CPU's flags, where the
    engine thread's and the turns' time went, the engine-alone baseline, the profile (or why it is missing)."""
    run, docs = short_run["run"], short_run["docs"]
    md = (docs / "loadtest.md").read_text()
    assert "float32, dense weights" in run["config"]["model"] and run["config"]["model"] in md
    assert run["cpu_info"]["model"] and run["cpu"] in md
    assert set(run["cpu_info"]["flags"]) <= {"AVX2", "FMA", "AVX512", "AVX512-BF16", "AVX512-VNNI", "AVX-VNNI",
                                             "AMX", "AMX-BF16", "AMX-INT8"}
    head = run["headline"]
    time = head["time"]
    assert time["measured"] and time["replicas"] == REPLICAS
    assert set(time["engine_share"]) == {"forward_s", "sample_s", "output_s", "step_other_s", "deliver_s",
                                         "commands_s", "idle_s"}
    assert all(share >= 0 for share in time["engine_share"].values())
    assert time["per_step"]["steps"] > 0 and time["per_step"]["decode_rows"] > 0
    assert time["turns"] > 0 and all(v is not None and v >= 0 for v in time["per_turn_ms"].values())
    assert head["window"]["measured"] and head["window"]["turns_per_s"] > 0
    assert "### Where the time goes" in md and "| forward |" in md and "| commit (transcript append in Redis) |" in md
    assert any(image.endswith("_time.png") for image in run["images"])
    # The engine on its own at the batch the run reached, and the served share against it.
    engine = head["engine_alone"]
    assert engine["batch"] >= 1 and engine["decode_tokens_per_s"] > 0 and engine["step_ms_p50"] > 0
    assert engine["served_share"] > 0 and engine["replicas"] == REPLICAS
    assert run["engine_alone"]["threads"] >= 1 and run["config"]["replica_omp_num_threads"] >= 1
    assert "### Served rate against the engine alone" in md
    # py-spy may be missing or not allowed to attach here: then the report says why.
    profile = run["profile"]
    if profile["ok"]:
        assert profile["all"]["summary"]["samples"] > 0
        assert any(t["thread"].startswith("sinkserve-engine-loop") for t in profile["all"]["summary"]["threads"])
        assert "### Profile of the replica process (py-spy)" in md
    else:
        assert "Profile (py-spy) of the replica: not taken" in md
