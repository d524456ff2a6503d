"""The load-test report's arithmetic and rendering on made-up inputs (no stack, no model)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import profile, report
from loadtest.stack import busy_threads, cpu_info


def _sample(t: float, replica: str = "r1", pid: int = 7, **counters) -> dict:
    row = {"unix_s": t, "replica_id": replica, "pid": pid, "reported_ms": int(t * 1000), "slots": 4}
    row.update({key: 0 for key in ("forward_s", "sample_s", "output_s", "step_other_s", "deliver_s", "commands_s",
                                   "idle_s", "steps", "decode_rows", "prefill_tokens", "turns", "queue_s",
                                   "first_token_s", "decode_s", "commit_s", "parks", "unparks", "drops", "rebuilt",
                                   "refused_early", "commands")})
    row.update(counters)
    return row


def test_time_breakdown_takes_the_counters_deltas_over_the_window():
    samples = [
        _sample(0, forward_s=100, steps=1000, decode_rows=5000, turns=10),  # before the window: a baseline only
        _sample(10, forward_s=101, idle_s=1, steps=1010, decode_rows=5040, prefill_tokens=100, turns=12,
                queue_s=0.2, decode_s=2, parks=1),
        _sample(20, forward_s=107, sample_s=1, idle_s=3, steps=1030, decode_rows=5120, prefill_tokens=140, turns=16,
                queue_s=0.6, decode_s=4, commit_s=0.04, parks=3, refused_early=2),
        _sample(30, forward_s=200, steps=5000),  # after the window
    ]
    t = report.time_breakdown(samples, 5, 25)
    assert t["measured"] and t["window_s"] == 10 and t["replicas"] == 1
    assert t["engine_share"]["forward_s"] == 0.6 and t["engine_share"]["sample_s"] == 0.1
    assert t["engine_share"]["idle_s"] == 0.2
    assert abs(t["unaccounted_share"] - 0.1) < 1e-9 and abs(t["busy_share"] - 0.7) < 1e-9
    assert t["per_step"]["steps"] == 20 and t["per_step"]["decode_rows"] == 4.0
    assert t["per_step"]["prefill_tokens"] == 2.0 and t["per_step"]["step_ms"] == 350.0
    assert t["per_turn_ms"] == {"queue_s": 100.0, "first_token_s": 0.0, "decode_s": 500.0, "commit_s": 10.0}
    assert t["moves"]["parks"] == 2 and t["moves"]["refused_early"] == 2
    assert report.batch_reached({"time": t}) == 4


def test_time_breakdown_sums_replicas_and_survives_old_samples():
    samples = [_sample(10, "a", forward_s=1, steps=10), _sample(20, "a", forward_s=6, steps=20),
               _sample(10, "b", forward_s=0, steps=0), _sample(20, "b", forward_s=3, steps=30)]
    t = report.time_breakdown(samples, 0, 30)
    assert t["replicas"] == 2 and t["engine_share"]["forward_s"] == 0.4 and t["per_step"]["steps"] == 40
    # CSV rows come back as strings; rows from before the counters existed carry none.
    as_strings = [{k: str(v) for k, v in row.items()} for row in samples]
    assert report.time_breakdown(as_strings, 0, 30)["engine_share"]["forward_s"] == 0.4
    old = [{"unix_s": 10, "replica_id": "a", "steps": 3}, {"unix_s": 20, "replica_id": "a", "steps": 9}]
    assert report.time_breakdown(old, 0, 30) == {"measured": False}


def _step(users: int, ttft_p99: float, turns_per_s: float) -> dict:
    return {"users": users, "ttft_p99_ms": ttft_p99, "turns": int(turns_per_s * 100), "duration_s": 100,
            "window": {"measured": True, "window_s": 50, "turns_per_s": turns_per_s,
                       "tokens_per_s": 16 * turns_per_s}}


def test_saturation_is_where_ttft_p99_crosses_half_the_deadline():
    steps = [_step(50, 2_000, 4.0), _step(100, 20_000, 6.0), _step(200, 40_000, 7.0), _step(400, 50_000, 6.5)]
    sat = report.saturation(steps, 60)
    assert sat["reached"] and sat["below_users"] == 100 and sat["first_over_users"] == 200
    assert sat["users"] == 150 and sat["turns_per_s"] == 6.5  # half-way between 20 s and 40 s
    assert sat["peak_turns_per_s"] == 7.0 and sat["peak_at_users"] == 200
    assert "between 100 and 200 chats" in report._saturation_line(sat, 60)
    assert not report.saturation(steps[:2], 60)["reached"]
    first = report.saturation(steps[2:], 60)
    assert first["reached"] and first["below_users"] is None
    assert "already at the smallest step" in report._saturation_line(first, 60)


def test_served_share_is_against_the_engine_at_the_batch_reached():
    step = _step(100, 1_000, 5.0)
    step.update(itl_p50_ms=60.0, time={"replicas": 2, "per_step": {"decode_rows": 7.6}}, replica_state={"replicas": 2})
    baseline = {"by_batch": {"8": {"batch": 8, "decode_tokens_per_s": 100.0, "turn_tokens_per_s": 50.0,
                                   "step_ms_p50": 30.0}}}
    report.attach_engine_alone(step, baseline)
    e = step["engine_alone"]
    assert e["batch"] == 8 and e["engine_tokens_per_s"] == 200.0 and e["served_tokens_per_s"] == 80.0
    assert e["served_share"] == 0.4 and e["served_share_of_turn_rate"] == 0.8 and e["itl_p50_over_step"] == 2.0


def test_every_section_renders_for_a_sweep(tmp_path: Path):
    steps = []
    for users, p99, rate in ((50, 2_000, 4.0), (100, 40_000, 6.0)):
        step = _step(users, p99, rate)
        samples = [_sample(10, forward_s=1, idle_s=1, steps=100, decode_rows=300, turns=10, queue_s=1, decode_s=5),
                   _sample(20, forward_s=8, idle_s=2, steps=200, decode_rows=900, turns=30, queue_s=3, decode_s=15)]
        step.update(
            duration_s=100, warmup_s=40, turns=400, failed_turns=1, failures_by_code={"RESOURCE_EXHAUSTED": 1},
            refused_early=1, refused_early_share=0.0025, ttft_p50_ms=500, itl_p50_ms=80, itl_p99_ms=300,
            turn_p50_ms=2_000, turn_p99_ms=9_000, tokens_per_s=60.0, peak_replica_rss_mb=900, machine_load_avg=1.5,
            turns_interrupted_at_stop=0, session_create_errors={}, sessions_served=users, session_checks={"match": 3},
            memory={"measured": False}, time=report.time_breakdown(samples, 0, 30),
            replica_state={"replicas": 1, "total_slots": 64, "peak_resident_sessions": 64, "peak_parked_sessions": 0,
                           "counters": {"parks": 0}},
        )
        report.attach_engine_alone(step, {"by_batch": {"6": {"batch": 6, "decode_tokens_per_s": 120.0,
                                                             "turn_tokens_per_s": 60.0, "step_ms_p50": 50.0}}})
        steps.append(step)
    summary = profile.summarise(_raw(tmp_path), seconds=2, rate=10)
    run = {
        "title": None, "note": "", "date": "2026-01-01 00:00", "machine": "2 CPU cores", "cpu": "Some CPU, flags: AVX2",
        "command": "python -m loadtest.run", "results_dir": "loadtest/results/x", "images": ["img/x_time.png"],
        "config": {"target": "local", "model": "M (float32, dense weights)", "replicas": 1, "slots": 64, "sinks": 4,
                   "window": 252, "max_tokens": 16, "think_s": [5, 15], "turn_timeout_s": 60, "spawn_rate": 10,
                   "duration_s": 100, "replica_cpus": 1, "replica_omp_num_threads": 1},
        "engine_alone": {"threads": 1, "by_batch": {"6": {"batch": 6, "loadavg_1m": 1.2}},
                         "other_threads": {"2": {"batch": 6, "decode_tokens_per_s": 200.0, "step_ms_p50": 30.0,
                                                 "turn_tokens_per_s": 90.0}}},
        "profile": {"ok": True, "users": 100, "started_after_s": 40,
                    "all": {"ok": True, "command": "py-spy record -p 1 -o x", "summary": summary}},
        "largest_passing_users": 50, "headline": steps[0], "steps": steps,
    }
    report.render_markdown({"runs": {"x": run}}, tmp_path / "loadtest.md")
    md = (tmp_path / "loadtest.md").read_text()
    for text in ("- CPU: Some CPU, flags: AVX2", "M (float32, dense weights)", "**Saturation (TTFT p99 over half",
                 "### Served rate against the engine alone", "With 2 torch thread(s) instead", "### Where the time goes",
                 "| forward | 70.0% | 70.0% |", "| queue (arrival until the cache is in a slot) | 100 ms | 100 ms |",
                 "### Profile of the replica process (py-spy)", "sinkserve-engine-loop [11]",
                 "RESOURCE_EXHAUSTED 1", "| served share of the engine alone"):
        assert text in md, text
    assert report.plot_time(steps, "x", tmp_path / "time.png").stat().st_size > 0
    assert report.plot_sweep(steps, "x", tmp_path / "sweep.png", 60).stat().st_size > 0
    json.dumps(run)  # the entry stays JSON


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "py-spy.raw"
    raw.write_text(
        "thread (11): sinkserve-engine-loop;EngineLoop._run (sinkserve/replica/loop.py:270);"
        "Engine.step (sinkserve/engine/engine.py:230);forward (torch/nn/modules/linear.py:134) 12\n"
        "thread (12): AsyncIO Thread: default;run (asyncio/base_events.py:600);"
        "execute_command (redis/asyncio/client.py:700) 3\n"
        "thread (13);Thread.run (threading.py:982);_WorkItem.run (concurrent/futures/thread.py:58) 5\n"
    )
    return raw


def test_profile_summary_splits_the_engine_thread_from_the_rest(tmp_path: Path):
    s = profile.summarise(_raw(tmp_path), seconds=2, rate=10)
    assert s["samples"] == 20 and s["engine_thread_share"] == 0.6
    assert s["threads"][0] == {"thread": "sinkserve-engine-loop [11]", "samples": 12, "busy_share_of_wall": 0.6}
    assert {t["thread"] for t in s["threads"]} == {"sinkserve-engine-loop [11]", "AsyncIO Thread: default [12]",
                                                   "? [13]"}
    outside = {c["what"]: c["samples"] for c in s["outside_engine_by_category"]}
    assert outside == {"Redis client": 3, "thread pool, native work item": 5}
    assert s["engine_thread_by_category"][0]["what"] == "torch"


def test_cpu_info_names_the_model_and_the_flags(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f "
                       "avx512_bf16 avx512_vnni amx_tile\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n")
    info = cpu_info(cpuinfo)
    assert info["model"] == "Test CPU 9000" and info["bf16_native"]
    assert info["flags"] == ["AVX2", "FMA", "AVX512", "AVX512-BF16", "AVX512-VNNI", "AMX"]


def test_busy_threads_are_the_ones_that_used_cpu():
    before = {1: ("a", 1.0), 2: ("b", 5.0)}
    after = {1: ("a", 1.01), 2: ("b", 9.0), 3: ("c", 1.0)}
    assert busy_threads(before, after, wall_s=10) == [
        {"tid": 2, "name": "b", "cpu_share": 0.4}, {"tid": 3, "name": "c", "cpu_share": 0.1}]


def test_headline_is_the_largest_passing_step_or_the_best_served():
    steps = [_step(50, 2_000, 4.0), _step(100, 20_000, 6.0), _step(200, 40_000, 3.0)]
    assert report.headline_index(steps, 50) == 0
    assert report.headline_index(steps, None) == 1  # most generated tokens/s
    assert report.headline_index(steps[:1], None) == 0


def test_fault_plan_and_recovery_analysis():
    from loadtest import faults

    plan = faults.FaultPlan(kill_replica_every_s=120, restart_redis_at_s=300)
    assert plan.times(600) == [(120, "replica"), (240, "replica"), (300, "redis"), (360, "replica"), (480, "replica")]
    assert not faults.FaultPlan().any
    # 2 turns/s for 100 s, nothing for 20 s after a fault at t=100, then 2 turns/s again.
    t0 = 1_000.0
    log = [[t0 + i * 0.5, "OK"] for i in range(200)]
    log += [[t0 + 101, "UNAVAILABLE"], [t0 + 102, "UNAVAILABLE"]]
    log += [[t0 + 120 + i * 0.5, "OK"] for i in range(80)]
    result = faults.analyse([{"kind": "replica", "unix_s": t0 + 100, "target": "r1"}], log, t0, t0 + 160)
    (fault,) = result["faults"]
    assert fault["at_s"] == 100 and fault["turns_per_s_before"] == 2.0
    assert 17 <= fault["recovered_s"] <= 21  # the first 10 s window back at 80% starts just before t=120
    assert fault["failed_during_recovery"] == {"UNAVAILABLE": 2}
    assert result["series"] and all(len(point) == 3 for point in result["series"])
    never = faults.analyse([{"kind": "redis", "unix_s": t0 + 150}], log[:200], t0, t0 + 160)["faults"][0]
    assert never["recovered_s"] is None


def test_recorded_command_keeps_paths_inside_the_repository_only(tmp_path: Path):
    from loadtest import run

    argv = ["--users", "200", "--api-key", "secret", "--results-dir", str(tmp_path / "r"),
            f"--docs-dir={run.ROOT / 'docs'}", "--name", "x"]
    command = run.recorded_command(argv, "secret")
    assert "secret" not in command
    assert str(tmp_path) not in command
    assert "--results-dir '<outside the repository>'" in command
    assert "--docs-dir=docs" in command
    assert run.repo_relative(run.ROOT / "loadtest" / "results" / "x") == "loadtest/results/x"
