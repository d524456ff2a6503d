"""Turn one load run's raw output (Locust CSVs, the users' tally, replica samples) into headline figures,
PNG plots, docs/loadtest.json and docs/loadtest.md.

docs/loadtest.json keeps every named run ({"runs": {name: run}}); a new run replaces the entry of the same
name and docs/loadtest.md is rendered again from all of them, so the tiny-model and SmolLM2 runs live
side by side.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

PERCENTILES = {"p50": "50%", "p90": "90%", "p99": "99%", "max": "100%"}
METRICS = {
    "TTFT": "time to first token",
    "ITL": "inter-token latency",
    "TURN": "whole turn",
    "SESSION": "CreateSession",
    "CHECK": "GetSession turn-count check",
}
ITL_TARGET_MS = 1000.0  # the SmolLM2 target: p99 inter-token latency under 1 s
FLAT_TOLERANCE = 0.05  # RSS growth after warm-up below 5 % (and below FLAT_MIN_MB) counts as flat
FLAT_MIN_MB = 25.0


def _number(value: str | None) -> float | None:
    if value in (None, "", "N/A"):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _percentile(histogram: dict[str, int], fraction: float) -> float | None:
    """The smallest recorded value with at least ``fraction`` of the samples at or below it."""
    points = sorted((float(value), count) for value, count in histogram.items())
    total = sum(count for _, count in points)
    if not total:
        return None
    seen = 0
    for value, count in points:
        seen += count
        if seen >= fraction * total:
            return value
    return points[-1][0]


def locust_stats(csv_prefix: Path) -> dict[str, dict[str, float | None]]:
    """{request_type: {count, failures, avg, p50, p90, p99, max}} in ms over the whole run.

    Read from <prefix>_final.json (Locust's --json-file, written once every user has stopped, with the full
    response-time histogram); <prefix>_stats.csv is only the fallback, as Locust rewrites it once a second
    and its last write can miss the final turns."""
    final = Path(f"{csv_prefix}_final.json")
    out: dict[str, dict[str, float | None]] = {}
    if final.exists():
        for entry in json.loads(final.read_text()):
            kind = entry.get("method", "")
            if kind not in METRICS:
                continue
            histogram = entry.get("response_times") or {}
            count = int(entry.get("num_requests") or 0)
            out[kind] = {
                "count": count,
                "failures": int(entry.get("num_failures") or 0),
                "avg": round(entry["total_response_time"] / count, 1) if count else None,
                "p50": _percentile(histogram, 0.50),
                "p90": _percentile(histogram, 0.90),
                "p99": _percentile(histogram, 0.99),
                "max": round(entry["max_response_time"], 1) if entry.get("max_response_time") is not None else None,
            }
        return out
    for row in read_csv(Path(f"{csv_prefix}_stats.csv")):
        kind = row.get("Type", "")
        if kind not in METRICS:
            continue
        entry: dict[str, float | None] = {
            "count": _number(row.get("Request Count")) or 0,
            "failures": _number(row.get("Failure Count")) or 0,
            "avg": _number(row.get("Average Response Time")),
        }
        for key, column in PERCENTILES.items():
            entry[key] = _number(row.get(column))
        out[kind] = entry
    return out


def locust_history(csv_prefix: Path) -> dict[str, list[dict[str, float | None]]]:
    """Per-second rows of <prefix>_stats_history.csv by request type (plus 'Aggregated').

    Locust's percentiles there cover a sliding window of the last few seconds, which is what the
    latency-over-time plots show."""
    out: dict[str, list[dict[str, float | None]]] = {}
    for row in read_csv(Path(f"{csv_prefix}_stats_history.csv")):
        kind = row.get("Type") or ""
        if row.get("Name") == "Aggregated":
            kind = "Aggregated"
        out.setdefault(kind, []).append(
            {
                "unix_s": _number(row.get("Timestamp")),
                "users": _number(row.get("User Count")),
                "rps": _number(row.get("Requests/s")),
                "p50": _number(row.get("50%")),
                "p99": _number(row.get("99%")),
                "total": _number(row.get("Total Request Count")),
            }
        )
    return out


def memory_summary(rows: list[dict[str, Any]], t0: float, warmup_s: float) -> dict[str, Any]:
    """Peak RSS per replica and its growth between the end of warm-up and the end of the run."""
    by_replica: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        rss = _number(str(row.get("rss_mb"))) if row.get("rss_mb") not in (None, "") else None
        if rss is not None:
            by_replica.setdefault(str(row["replica_id"]), []).append((float(row["unix_s"]) - t0, rss))
    if not by_replica:
        return {"measured": False}
    replicas = {}
    for replica, samples in by_replica.items():
        samples.sort()
        after = [rss for t, rss in samples if t >= warmup_s] or [rss for _, rss in samples]
        head = statistics.median(after[:5])
        tail = statistics.median(after[-5:])
        replicas[replica[:12]] = {
            "peak_mb": round(max(rss for _, rss in samples), 1),
            "after_warmup_mb": round(head, 1),
            "at_end_mb": round(tail, 1),
            "growth_mb": round(tail - head, 1),
        }
    worst = max(replicas.values(), key=lambda r: r["growth_mb"])
    flat = all(r["growth_mb"] <= max(FLAT_MIN_MB, FLAT_TOLERANCE * r["after_warmup_mb"]) for r in replicas.values())
    return {
        "measured": True,
        "warmup_s": round(warmup_s, 1),
        "replicas": replicas,
        "peak_replica_rss_mb": max(r["peak_mb"] for r in replicas.values()),
        "total_peak_rss_mb": round(sum(r["peak_mb"] for r in replicas.values()), 1),
        "max_growth_after_warmup_mb": worst["growth_mb"],
        "flat_after_warmup": flat,
    }


COUNTERS = ("parks", "unparks", "drops", "rebuilt", "steps")  # load-report counts since each replica started


def replica_counters(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last load report of each replica: slots, and its residency counters (parks, unparks, drops, ...)."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        last[str(row["replica_id"])] = row
    totals = {name: sum(int(row.get(name) or 0) for row in last.values()) for name in COUNTERS}
    # Gauges summed over the replicas at each sampling time; their peaks over the run.
    by_time: dict[float, dict[str, int]] = {}
    for row in rows:
        slot = by_time.setdefault(float(row["unix_s"]), {"resident": 0, "parked": 0})
        slot["resident"] += int(row.get("sessions") or 0)
        slot["parked"] += int(row.get("parked") or 0)
    return {
        "replicas": len(last),
        "total_slots": sum(int(row.get("slots") or 0) for row in last.values()),
        "peak_resident_sessions": max((v["resident"] for v in by_time.values()), default=0),
        "peak_parked_sessions": max((v["parked"] for v in by_time.values()), default=0),
        "counters": totals,
        "parked_and_resumed": totals["parks"] > 0 and totals["unparks"] > 0,
    }


def step_summary(
    users: int,
    duration_s: float,
    spawn_rate: float,
    csv_prefix: Path,
    tally: dict[str, Any],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    """Headline figures of one Locust run."""
    stats = locust_stats(csv_prefix)
    history = locust_history(csv_prefix)
    aggregated = history.get("Aggregated") or []
    t0 = next((r["unix_s"] for r in aggregated if r["unix_s"]), None)
    if t0 is None:
        t0 = min((float(r["unix_s"]) for r in samples), default=0.0)
    ramp_s = users / spawn_rate if spawn_rate > 0 else 0.0
    # Warm-up: the ramp plus a minute, and at least the first 40 % of the run (allocator pools and caches
    # grow for a while at full load); never more than half of it.
    warmup_s = min(max(ramp_s + 60.0, 0.4 * duration_s), duration_s / 2)
    memory = memory_summary(samples, t0, warmup_s)
    replicas = replica_counters(samples)

    def pct(kind: str, key: str) -> float | None:
        return (stats.get(kind) or {}).get(key)

    turns_ok = int(tally.get("turns_ok", 0))
    failed = int(tally.get("turns_failed", 0))
    sessions_served = int(tally.get("sessions_with_turns", 0))
    summary = {
        "users": users,
        "duration_s": duration_s,
        "spawn_rate": spawn_rate,
        "turns": turns_ok + failed,
        "failed_turns": failed,
        "failures_by_code": tally.get("failures_by_code", {}),
        "turns_interrupted_at_stop": int(tally.get("turns_interrupted_at_stop", 0)),
        "session_create_errors": tally.get("session_errors_by_code", {}),
        "sessions_created": int(tally.get("sessions_created", 0)),
        "sessions_served": sessions_served,
        "turns_per_session_min_max": [tally.get("min_turns_per_session", 0), tally.get("max_turns_per_session", 0)],
        "completion_tokens": int(tally.get("completion_tokens", 0)),
        "tokens_per_s": round(int(tally.get("completion_tokens", 0)) / duration_s, 1) if duration_s else None,
        "session_checks": tally.get("session_checks", {}),
        "ttft_p50_ms": pct("TTFT", "p50"),
        "ttft_p99_ms": pct("TTFT", "p99"),
        "itl_p50_ms": pct("ITL", "p50"),
        "itl_p99_ms": pct("ITL", "p99"),
        "turn_p50_ms": pct("TURN", "p50"),
        "turn_p99_ms": pct("TURN", "p99"),
        "create_session_p99_ms": pct("SESSION", "p99"),
        "peak_replica_rss_mb": memory.get("peak_replica_rss_mb"),
        "machine_load_avg": _mean_load(samples),
        "memory": memory,
        "replica_state": replicas,
        "more_sessions_than_slots": bool(replicas["total_slots"]) and sessions_served > replicas["total_slots"],
        "latency_ms": stats,
        "error_samples": tally.get("error_samples", [])[:5],
    }
    return summary


def _mean_load(samples: list[dict[str, Any]]) -> float | None:
    loads = [_number(str(r.get("loadavg_1m"))) for r in samples if r.get("loadavg_1m") not in (None, "")]
    loads = [x for x in loads if x is not None]
    return round(statistics.mean(loads), 1) if loads else None


def passes_itl_target(step: dict[str, Any]) -> bool:
    itl = step.get("itl_p99_ms")
    return step["failed_turns"] == 0 and step["turns"] > 0 and itl is not None and itl < ITL_TARGET_MS


# ------------------------------------------------------------------------------------------------ plots
def plot_timeline(csv_prefix: Path, samples: list[dict[str, Any]], title: str, out_png: Path) -> Path:
    """Users and turns/s, TTFT p50/p99, inter-token latency p50/p99 and replica RSS over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = locust_history(csv_prefix)
    aggregated = history.get("Aggregated") or []
    t0 = next((r["unix_s"] for r in aggregated if r["unix_s"]), None) or min(
        (float(r["unix_s"]) for r in samples), default=0.0
    )

    def series(kind: str, key: str) -> tuple[list[float], list[float]]:
        # Rows before the first request carry 0 percentiles, not measurements.
        points = [
            (r["unix_s"] - t0, r[key])
            for r in history.get(kind, [])
            if r["unix_s"] and r[key] is not None and (key in ("users", "rps") or r["total"])
        ]
        return [p[0] for p in points], [p[1] for p in points]

    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    ax = axes[0]
    ax.plot(*series("Aggregated", "users"), color="black", label="users")
    ax.set_ylabel("concurrent chats")
    twin = ax.twinx()
    twin.plot(*series("TURN", "rps"), color="tab:green", alpha=0.7, label="turns/s")
    twin.set_ylabel("turns / s", color="tab:green")
    ax.set_title(title)
    for ax, kind, label in ((axes[1], "TTFT", "time to first token"), (axes[2], "ITL", "inter-token latency")):
        for key, style in (("p50", "-"), ("p99", "--")):
            xs, ys = series(kind, key)
            ax.plot(xs, ys, style, label=f"{key}")
        ax.set_ylabel(f"{label} (ms)")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    ax = axes[3]
    by_replica: dict[str, list[tuple[float, float]]] = {}
    for row in samples:
        if row.get("rss_mb") not in (None, ""):
            by_replica.setdefault(str(row["replica_id"]), []).append((float(row["unix_s"]) - t0, float(row["rss_mb"])))
    for i, (replica, points) in enumerate(sorted(by_replica.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"replica {i + 1}")
    if by_replica:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "replica RSS not measured (remote target)", ha="center", transform=ax.transAxes)
    ax.set_ylabel("replica RSS (MiB)")
    ax.set_xlabel("seconds since start")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def plot_sweep(steps: list[dict[str, Any]], title: str, out_png: Path) -> Path:
    """p50/p99 inter-token latency and TTFT against the number of concurrent chats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s["users"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style, label in (
        ("itl_p50_ms", "o-", "inter-token p50"),
        ("itl_p99_ms", "o--", "inter-token p99"),
        ("ttft_p99_ms", "s:", "TTFT p99"),
    ):
        ax.plot(users, [s.get(key) or float("nan") for s in steps], style, label=label)
    ax.axhline(ITL_TARGET_MS, color="red", linewidth=0.8, label="1 s")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent endless chats")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------------------ docs
def update_json(path: Path, name: str, run: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"runs": {}}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            pass
    data.setdefault("runs", {})[name] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return data


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} MiB"


def render_markdown(data: dict[str, Any], md_path: Path) -> None:
    lines = [
        "# Load test: many concurrent endless chats",
        "",
        "Every Locust user is one endless chat over gRPC: it creates one session, then sends turn after turn",
        "with think time in between and never resets it. Time to first token (TTFT), inter-token latency (ITL,",
        "one sample per gap between streamed deltas) and whole-turn latency are separate Locust metrics; a turn",
        "fails on any gRPC error (counted by status code), on a stream without a final event, or when the final",
        "event shows the session lost history (turn number not advancing by one, cache shrinking). After every",
        "few turns a user also checks with GetSession that the registry holds exactly the turns it saw.",
        "",
        "Reproduce: `make loadtest` (defaults below), or `python -m loadtest.run --help`. Without `--target` the",
        "runner starts the local stack on 127.0.0.1 (redis-server, local Ray, the Serve app, the gateway),",
        "samples each replica's RSS from the pid in its load report, and stops everything it started.",
        "Raw output (Locust CSVs, the Locust HTML report, replica samples) goes to `loadtest/results/<run>/` on",
        "the machine that ran it and is not kept in git; this page and `loadtest.json` keep the summaries.",
        "",
    ]
    for name, run in data.get("runs", {}).items():
        lines += _run_section(name, run)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines).rstrip() + "\n")


def _run_section(name: str, run: dict[str, Any]) -> list[str]:
    cfg = run["config"]
    head = run["headline"]
    lines = [f"## {run.get('title') or name}", ""]
    if run.get("note"):
        lines += [run["note"], ""]
    lines += [
        f"- run `{name}`, {run['date']}, {run['machine']}",
        f"- command: `{run['command']}`",
        f"- model: {cfg['model']}",
        f"- stack: {cfg['target']}"
        + (f"; {cfg['replicas']} replica(s) × {cfg['slots']} KV slots" if cfg.get("replicas") else "")
        + (f", cache {cfg['sinks']} sinks + {cfg['window']} window entries per session" if cfg.get("sinks") else ""),
        f"- each turn: up to {cfg['max_tokens']} new tokens ({cfg.get('sampling', 'greedy')}), deadline {cfg['turn_timeout_s']:.0f} s; think time "
        f"{cfg['think_s'][0]:g}–{cfg['think_s'][1]:g} s; spawn rate {cfg['spawn_rate']:g} users/s",
        "",
    ]
    steps = run["steps"]
    if len(steps) > 1:
        lines += [
            "| chats | turns | failed | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | tokens/s | peak replica RSS | load avg |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in steps:
            lines.append(
                f"| {s['users']} | {s['turns']} | {s['failed_turns']} | {_ms(s['ttft_p50_ms'])} | "
                f"{_ms(s['ttft_p99_ms'])} | {_ms(s['itl_p50_ms'])} | {_ms(s['itl_p99_ms'])} | "
                f"{s['tokens_per_s']} | {_mb(s['peak_replica_rss_mb'])} | {s.get('machine_load_avg') or '–'} |"
            )
        best = run.get("largest_passing_users")
        lines += [
            "",
            f"**Largest number of concurrent chats with p99 inter-token latency under 1 s and no failed turn: "
            f"{best if best is not None else 'none of the steps'}.**",
            "",
        ]
    lines += [
        "| headline | value |",
        "|---|---|",
        f"| concurrent chats (users) | {head['users']} |",
        f"| duration | {head['duration_s']:.0f} s |",
        f"| turns | {head['turns']} |",
        f"| failed turns | {head['failed_turns']} |",
        f"| TTFT p50 / p99 | {_ms(head['ttft_p50_ms'])} / {_ms(head['ttft_p99_ms'])} |",
        f"| inter-token latency p50 / p99 | {_ms(head['itl_p50_ms'])} / {_ms(head['itl_p99_ms'])} |",
        f"| whole turn p50 / p99 | {_ms(head['turn_p50_ms'])} / {_ms(head['turn_p99_ms'])} |",
        f"| generated tokens / s | {head['tokens_per_s']} |",
        f"| peak replica RSS | {_mb(head['peak_replica_rss_mb'])} |",
        f"| sessions served / KV slots | {head['sessions_served']} / {head['replica_state']['total_slots']} |",
    ]
    if head.get("machine_load_avg") is not None:
        lines.append(f"| machine load average during the run (1 min, all processes) | {head['machine_load_avg']} |")
    lines.append("")
    if head.get("turns_interrupted_at_stop"):
        lines += [
            f"{head['turns_interrupted_at_stop']} turns still streaming when the run ended were cut off by the stop "
            "(counted neither as turns nor as failures).",
            "",
        ]
    if head["failures_by_code"] or head["session_create_errors"]:
        codes = ", ".join(f"{code} × {n}" for code, n in head["failures_by_code"].items()) or "none"
        create = ", ".join(f"{code} × {n}" for code, n in head["session_create_errors"].items()) or "none"
        lines += [f"Failed turns by status: {codes}. CreateSession errors: {create}.", ""]
    memory = head["memory"]
    if memory.get("measured"):
        verdict = "flat" if memory["flat_after_warmup"] else "NOT flat"
        lines += [
            f"Replica memory after warm-up ({memory['warmup_s']:.0f} s) is **{verdict}**: largest growth "
            f"{memory['max_growth_after_warmup_mb']:+.1f} MiB from the end of warm-up to the end of the run "
            f"(flat = under {FLAT_TOLERANCE:.0%} or {FLAT_MIN_MB:.0f} MiB). Per replica: "
            + "; ".join(
                f"{r['after_warmup_mb']:.0f} → {r['at_end_mb']:.0f} MiB (peak {r['peak_mb']:.0f})"
                for r in memory["replicas"].values()
            )
            + ".",
            "",
        ]
    state = head["replica_state"]
    counters = ", ".join(f"{k} {int(v)}" for k, v in sorted(state["counters"].items())) or "none reported"
    # runs recorded before the engine counted residency itself call unparks "resumes"
    parks = int(state["counters"].get("parks", 0))
    resumes = int(state["counters"].get("unparks", state["counters"].get("resumes", 0)))
    rebuilt = int(state["counters"].get("rebuilt", 0))
    if parks:
        slots_line = (
            f"Idle sessions gave their slots up {parks} times (cache parked in host memory, peak "
            f"{state['peak_parked_sessions']} parked at once) and resumed from there {resumes} times; "
            f"{rebuilt} were rebuilt from their transcript."
        )
    else:
        slots_line = "Every chat had a slot of its own, so no session needed parking."
    lines += [
        f"Sessions vs slots: {head['sessions_served']} chats were served by {state['total_slots']} KV slots "
        f"(peak {state['peak_resident_sessions']} resident). {slots_line} Replica counters at the end: {counters}. "
        f"GetSession turn-count checks (after every few turns): "
        + (", ".join(f"{k} {v}" for k, v in head["session_checks"].items()) or "none")
        + ".",
        "",
    ]
    for image in run.get("images", []):
        lines += [f"![{name}]({image})", ""]
    return lines


def refresh_run(run: dict[str, Any], root: Path) -> None:
    """Recompute a run's steps and headline from its raw output (after a change to this module)."""
    results = root / run["results_dir"]
    cfg = run["config"]
    steps = []
    for old in run["steps"]:
        step_dir = results if len(run["steps"]) == 1 else results / f"u{old['users']}"
        samples = read_csv(step_dir / "replicas.csv")
        tally = json.loads((step_dir / "tally.json").read_text())
        steps.append(step_summary(old["users"], cfg["duration_s"], cfg["spawn_rate"], step_dir / "locust", tally, samples))
    headline_users = run["headline"]["users"]
    run["steps"] = steps
    run["headline"] = next(s for s in steps if s["users"] == headline_users)
    passing = [s["users"] for s in steps if passes_itl_target(s)]
    run["largest_passing_users"] = max(passing) if passing else None


def main(argv: list[str] | None = None) -> None:
    """Re-render docs/loadtest.md from docs/loadtest.json, optionally setting a run's note first."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loadtest.report", description=main.__doc__)
    parser.add_argument("--docs-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--note", nargs=2, metavar=("RUN", "TEXT"), help="set the note printed above RUN's figures")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute every run's figures from its raw files in loadtest/results/ first "
                             "(runs whose raw files are not on this machine are kept as they are)")
    args = parser.parse_args(argv)
    json_path = args.docs_dir / "loadtest.json"
    data = json.loads(json_path.read_text())
    if args.refresh:
        root = Path(__file__).resolve().parent.parent
        for name, run in data.get("runs", {}).items():
            if not (root / run["results_dir"]).is_dir():
                print(f"{name}: no raw output in {run['results_dir']} (not kept in git); figures kept", file=sys.stderr)
                continue
            refresh_run(run, root)
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    if args.note:
        name, text = args.note
        if name not in data.get("runs", {}):
            parser.error(f"no run {name!r} in {json_path} (runs: {', '.join(data.get('runs', {})) or 'none'})")
        data["runs"][name]["note"] = text
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    render_markdown(data, args.docs_dir / "loadtest.md")


if __name__ == "__main__":
    main()
