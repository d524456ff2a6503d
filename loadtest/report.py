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
                "failures": _number(row.get("Total Failure Count")),
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


COUNTERS = ("parks", "unparks", "drops", "rebuilt", "refused_early", "steps")  # load-report counts since each replica started


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


# ------------------------------------------------------------------------------------ where the time goes
# The load report's cumulative engine-thread parts (seconds since the replica started): they add up to the
# thread's wall time, less the loop's own bookkeeping.
ENGINE_PARTS = {
    "forward_s": "forward",
    "sample_s": "sampling",
    "output_s": "output (detokenising, stop strings, bookkeeping)",
    "step_other_s": "rest of the step (planning, step inputs)",
    "deliver_s": "handing tokens to the turns' queues",
    "commands_s": "commands (park/unpark/rebuild, turn starts, views)",
    "idle_s": "idle (no work, waiting for commands)",
}
STEP_PARTS = ("forward_s", "sample_s", "output_s", "step_other_s")  # what engine.step() itself takes
TURN_PHASES = {
    "queue_s": "queue (arrival until the cache is in a slot)",
    "first_token_s": "first token (ingesting the message)",
    "decode_s": "decode (first to last token)",
    "commit_s": "commit (transcript append in Redis)",
}
MOVES = ("parks", "unparks", "drops", "rebuilt", "refused_early", "commands")
_CUMULATIVE = tuple(ENGINE_PARTS) + tuple(TURN_PHASES) + MOVES + (
    "steps", "decode_rows", "prefill_tokens", "turns", "rebuild_read_s")


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    return _number(str(value))


def window_deltas(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, float] | None:
    """The replicas' cumulative load-report counters from their first to their last report inside
    [start, end] (unix seconds), summed over replicas, with ``wall_s`` the replica-seconds between those
    reports. None when no replica has two reports carrying the counters in the window."""
    by_replica: dict[str, list[dict[str, Any]]] = {}
    for row in samples:
        t = _value(row, "unix_s")
        if t is not None and start <= t <= end and _value(row, "forward_s") is not None:
            by_replica.setdefault(str(row["replica_id"]), []).append(row)
    totals: dict[str, float] = {}
    replicas = 0
    for rows in by_replica.values():
        rows.sort(key=lambda r: float(r["unix_s"]))
        first, last = rows[0], rows[-1]
        if str(first.get("pid")) != str(last.get("pid")):  # the replica restarted: its counters did too
            first = next(r for r in rows if str(r.get("pid")) == str(last.get("pid")))
        first_ms, last_ms = _value(first, "reported_ms"), _value(last, "reported_ms")
        wall = (last_ms - first_ms) / 1000 if first_ms and last_ms else float(last["unix_s"]) - float(first["unix_s"])
        if wall <= 0:
            continue
        replicas += 1
        totals["wall_s"] = totals.get("wall_s", 0.0) + wall
        for key in _CUMULATIVE:
            a, b = _value(first, key), _value(last, key)
            if a is not None and b is not None:
                totals[key] = totals.get(key, 0.0) + (b - a)
    if not replicas:
        return None
    totals["replicas"] = replicas
    return totals


def time_breakdown(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Where the engine thread's time and the turns' time went over [start, end], from the load reports."""
    d = window_deltas(samples, start, end)
    if d is None:
        return {"measured": False}
    wall = d["wall_s"]
    parts = {key: d.get(key, 0.0) for key in ENGINE_PARTS}
    accounted = sum(parts.values())
    steps = d.get("steps", 0.0)
    turns = d.get("turns", 0.0)
    step_s = sum(parts[k] for k in STEP_PARTS)

    def per(total: float, count: float, scale: float = 1.0, digits: int = 1) -> float | None:
        return round(scale * total / count, digits) if count else None

    return {
        "measured": True,
        "window_s": round(wall / d["replicas"], 1),
        "replicas": d["replicas"],
        "engine_share": {key: round(value / wall, 4) for key, value in parts.items()},
        "unaccounted_share": round(1 - accounted / wall, 4),
        "busy_share": round((accounted - parts["idle_s"]) / wall, 4),
        "per_step": {
            "steps": int(steps),
            "steps_per_s": round(steps / wall, 1),
            "decode_rows": per(d.get("decode_rows", 0.0), steps, digits=2),
            "prefill_tokens": per(d.get("prefill_tokens", 0.0), steps, digits=2),
            "step_ms": per(step_s, steps, 1000, 2),
            "forward_ms": per(parts["forward_s"], steps, 1000, 2),
            "deliver_ms": per(parts["deliver_s"], steps, 1000, 2),
        },
        "per_turn_ms": {key: per(d.get(key, 0.0), turns, 1000) for key in TURN_PHASES},
        "turns": int(turns),
        "rebuild_read_ms": per(d.get("rebuild_read_s", 0.0), turns, 1000, 2),
        "moves": {key: int(d.get(key, 0)) for key in MOVES},
    }


def measured_throughput(csv_prefix: Path, start: float, end: float, tally: dict[str, Any]) -> dict[str, Any]:
    """Successful turns/s (and failed turns/s) and generated tokens/s over [start, end] from Locust's per-second
    history (the TURN rows' cumulative counts), tokens at the run's mean completion tokens per successful turn."""
    rows = [r for r in locust_history(csv_prefix).get("TURN", []) if r["unix_s"] and r["total"] is not None]
    inside = [r for r in rows if start <= r["unix_s"] <= end]
    if len(inside) < 2:
        return {"measured": False}
    first, last = inside[0], inside[-1]
    span = last["unix_s"] - first["unix_s"]
    if span <= 0:
        return {"measured": False}
    turns = last["total"] - first["total"]
    failed = (last.get("failures") or 0) - (first.get("failures") or 0)
    ok_turns = int(tally.get("turns_ok", 0))
    tokens_per_turn = int(tally.get("completion_tokens", 0)) / ok_turns if ok_turns else 0.0
    return {
        "measured": True,
        "window_s": round(span, 1),
        "turns_per_s": round((turns - failed) / span, 2),  # turns that succeeded: the goodput
        "failed_per_s": round(failed / span, 2),
        "tokens_per_s": round((turns - failed) * tokens_per_turn / span, 1),
        "tokens_per_turn": round(tokens_per_turn, 2),
    }


def saturation(steps: list[dict[str, Any]], deadline_s: float) -> dict[str, Any]:
    """Where TTFT p99 first crosses half the turn deadline: between which steps, at about how many chats
    and turns/s (linear between the two steps)."""
    limit_ms = deadline_s * 1000 / 2
    ordered = sorted(steps, key=lambda s: s["users"])
    best = max(ordered, key=lambda s: _turns_per_s(s) or 0.0, default=None)
    out: dict[str, Any] = {
        "limit_ms": limit_ms,
        "peak_turns_per_s": _turns_per_s(best) if best else None,
        "peak_at_users": best["users"] if best else None,
    }
    for i, step in enumerate(ordered):
        p99 = step.get("ttft_p99_ms")
        if p99 is None or p99 <= limit_ms:
            continue
        out["reached"] = True
        out["first_over_users"] = step["users"]
        if i == 0:
            out["below_users"] = None
            out["users"] = None
            out["turns_per_s"] = _turns_per_s(step)
            return out
        prev = ordered[i - 1]
        prev_p99 = prev.get("ttft_p99_ms") or 0.0
        f = (limit_ms - prev_p99) / (p99 - prev_p99) if p99 > prev_p99 else 1.0
        a, b = _turns_per_s(prev), _turns_per_s(step)
        out["below_users"] = prev["users"]
        out["users"] = round(prev["users"] + f * (step["users"] - prev["users"]))
        out["turns_per_s"] = round(a + f * (b - a), 2) if a is not None and b is not None else None
        return out
    out["reached"] = False
    return out


def _turns_per_s(step: dict[str, Any]) -> float | None:
    window = step.get("window") or {}
    if window.get("measured"):
        return window["turns_per_s"]
    ok = step["turns"] - step.get("failed_turns", 0)
    return round(ok / step["duration_s"], 2) if step.get("duration_s") else None


def _tokens_per_s(step: dict[str, Any]) -> float | None:
    window = step.get("window") or {}
    return window["tokens_per_s"] if window.get("measured") else step.get("tokens_per_s")


def batch_reached(step: dict[str, Any]) -> int | None:
    """The mean decode rows per engine step over the measured window, rounded (at least 1)."""
    rows = ((step.get("time") or {}).get("per_step") or {}).get("decode_rows")
    return max(1, round(rows)) if rows is not None else None


def attach_engine_alone(step: dict[str, Any], baseline: dict[str, Any]) -> None:
    """The stack's served rate against the engine alone at the batch the step reached (per replica)."""
    batch = batch_reached(step)
    figures = (baseline.get("by_batch") or {}).get(str(batch)) if batch else None
    if not figures:
        return
    replicas = (step.get("time") or {}).get("replicas") or step["replica_state"].get("replicas") or 1
    engine_rate = (figures.get("decode_tokens_per_s") or 0.0) * replicas
    served = _tokens_per_s(step)
    itl = step.get("itl_p50_ms")
    step["engine_alone"] = {
        **figures,
        "replicas": replicas,
        "engine_tokens_per_s": round(engine_rate, 1),
        "served_tokens_per_s": served,
        "served_share": round(served / engine_rate, 3) if served is not None and engine_rate else None,
        "served_share_of_turn_rate": round(served / (figures["turn_tokens_per_s"] * replicas), 3)
        if served is not None and figures.get("turn_tokens_per_s") else None,
        "itl_p50_over_step": round(itl / figures["step_ms_p50"], 2) if itl and figures.get("step_ms_p50") else None,
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
    window_start, window_end = t0 + warmup_s, t0 + duration_s
    attempted = turns_ok + failed
    whole_step = window_deltas(samples, float("-inf"), float("inf")) or {}
    refused = int(whole_step.get("refused_early", 0))
    summary = {
        "users": users,
        "duration_s": duration_s,
        "warmup_s": round(warmup_s, 1),
        "window": measured_throughput(csv_prefix, window_start, window_end, tally),
        "time": time_breakdown(samples, window_start, window_end),
        "refused_early": refused,
        "refused_early_share": round(refused / attempted, 4) if attempted else None,
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
        # None: a tally from before the users counted lost turns
        "lost_acknowledged_turns": tally.get("lost_acknowledged_turns"),
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


def headline_index(steps: list[dict[str, Any]], largest_passing: int | None) -> int:
    """The single run; in a sweep the largest step that met the 1 s p99 ITL target, or when none did, the step
    that served the most generated tokens per second."""
    if len(steps) == 1:
        return 0
    if largest_passing is not None:
        return [s["users"] for s in steps].index(largest_passing)
    rates = [_tokens_per_s(s) or 0.0 for s in steps]
    return rates.index(max(rates))


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


def plot_sweep(steps: list[dict[str, Any]], title: str, out_png: Path, deadline_s: float | None = None) -> Path:
    """Against concurrent chats: turns/s and generated tokens/s; TTFT p50/p99 (with half the deadline, where
    saturation is called); inter-token p50/p99 (with twice the engine-alone step time where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(steps, key=lambda s: s["users"])
    users = [s["users"] for s in steps]
    nan = float("nan")
    fig, axes = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    ax = axes[0]
    ax.plot(users, [_turns_per_s(s) or nan for s in steps], "o-", color="tab:green", label="turns/s")
    ax.set_ylabel("turns / s", color="tab:green")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(users, [_tokens_per_s(s) or nan for s in steps], "s--", color="tab:blue", label="generated tok/s")
    engine = [((s.get("engine_alone") or {}).get("engine_tokens_per_s") or nan) for s in steps]
    if any(e == e for e in engine):
        twin.plot(users, engine, "^:", color="tab:gray", label="engine alone at the batch reached")
    twin.set_ylabel("generated tokens / s", color="tab:blue")
    twin.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    for key, style, label in (("ttft_p50_ms", "o-", "TTFT p50"), ("ttft_p99_ms", "o--", "TTFT p99")):
        ax.plot(users, [(s.get(key) or nan) / 1000 for s in steps], style, label=label)
    if deadline_s:
        ax.axhline(deadline_s / 2, color="red", linewidth=0.8, label=f"half the deadline ({deadline_s / 2:g} s)")
        sat = saturation(steps, deadline_s)
        if sat.get("users"):
            ax.axvline(sat["users"], color="red", linestyle=":", linewidth=0.8, label=f"saturation ~{sat['users']} chats")
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[2]
    for key, style, label in (("itl_p50_ms", "o-", "inter-token p50"), ("itl_p99_ms", "o--", "inter-token p99")):
        ax.plot(users, [s.get(key) or nan for s in steps], style, label=label)
    twice = [2 * ((s.get("engine_alone") or {}).get("step_ms_p50") or nan) for s in steps]
    if any(t == t for t in twice):
        ax.plot(users, twice, "^:", color="tab:gray", label="2x engine-alone step at the batch reached")
    ax.axhline(ITL_TARGET_MS, color="red", linewidth=0.8, label="1 s")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent endless chats")
    ax.set_ylabel("inter-token latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def plot_time(steps: list[dict[str, Any]], title: str, out_png: Path) -> Path | None:
    """Where the time goes, one bar per step: the engine thread's wall time by part, the mean turn by phase,
    and the mean engine step (ms, with decode rows and prefill tokens per step)."""
    steps = [s for s in sorted(steps, key=lambda s: s["users"]) if (s.get("time") or {}).get("measured")]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(s["users"]) for s in steps]
    x = list(range(len(steps)))
    fig, axes = plt.subplots(3, 1, figsize=(11, 11))
    ax = axes[0]
    bottom = [0.0] * len(steps)
    colors = plt.get_cmap("tab10").colors
    for i, (key, label) in enumerate(ENGINE_PARTS.items()):
        values = [100 * s["time"]["engine_share"].get(key, 0.0) for s in steps]
        ax.bar(x, values, bottom=bottom, label=label, color=colors[i % len(colors)])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("engine thread wall time (%)")
    ax.set_ylim(0, 105)
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax = axes[1]
    bottom = [0.0] * len(steps)
    for i, (key, label) in enumerate(TURN_PHASES.items()):
        values = [(s["time"]["per_turn_ms"].get(key) or 0.0) / 1000 for s in steps]
        ax.bar(x, values, bottom=bottom, label=label, color=colors[(i + 3) % len(colors)])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("mean turn (s)")
    ax.set_xticks(x, labels)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax = axes[2]
    ax.bar(x, [s["time"]["per_step"].get("step_ms") or 0.0 for s in steps], color="tab:gray", label="ms per step")
    ax.set_ylabel("ms per engine step")
    ax.set_xticks(x, labels)
    ax.set_xlabel("concurrent endless chats")
    twin = ax.twinx()
    twin.plot(x, [s["time"]["per_step"].get("decode_rows") or 0.0 for s in steps], "o-", color="tab:blue",
              label="decode rows / step")
    twin.plot(x, [s["time"]["per_step"].get("prefill_tokens") or 0.0 for s in steps], "s--", color="tab:orange",
              label="prefill tokens / step")
    twin.set_ylabel("rows or tokens per step")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.1, 1), borderaxespad=0)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90, bbox_inches="tight")
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


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _saturation_line(sat: dict[str, Any], deadline_s: float) -> str:
    limit = f"TTFT p99 over half the {deadline_s:g} s turn deadline ({sat['limit_ms'] / 1000:g} s)"
    peak = (f" Peak throughput: {sat['peak_turns_per_s']} turns/s at {sat['peak_at_users']} chats."
            if sat.get("peak_turns_per_s") is not None else "")
    if not sat.get("reached"):
        return f"**Saturation ({limit}): not reached by any step.**{peak}"
    if sat.get("below_users") is None:
        return (f"**Saturation ({limit}): already at the smallest step, {sat['first_over_users']} chats "
                f"({sat.get('turns_per_s')} turns/s).**{peak}")
    return (f"**Saturation ({limit}): between {sat['below_users']} and {sat['first_over_users']} chats, about "
            f"{sat['users']} chats and {sat['turns_per_s']} turns/s (linear between the steps).**{peak}")


def _engine_alone_lines(run: dict[str, Any]) -> list[str]:
    rows = [s for s in run["steps"] if s.get("engine_alone")]
    baseline = run.get("engine_alone") or {}
    if not rows:
        if baseline.get("skipped"):
            return [f"Engine-alone baseline: not run ({baseline['skipped']}).", ""]
        return []
    threads = baseline.get("threads")
    cfg = run["config"]
    lines = [
        "### Served rate against the engine alone",
        "",
        "After the stack stopped, the same engine (same checkpoint, dtype, weights, cache, slots"
        + (f"; {threads} torch thread(s)" if threads else "")
        + ") ran in the load-test process on its own at the batch each step reached (mean decode rows per engine "
        "step in the measured window), with turns of the same shape (the users' messages, the same new tokens "
        "per turn); `loadtest/baseline.py`. *Engine decode* is its rate over steps in which every row decodes "
        "(the issue's engine-alone figure); *engine turns* is the whole cycle, ingesting every message and "
        "decoding every reply, all turns arriving at once. Served = the stack's generated tok/s over the "
        "measured window"
        + (" (per replica, times the replicas)" if any(r["engine_alone"].get("replicas", 1) > 1 for r in rows) else "")
        + ".",
        "",
        "| chats | batch reached | served tok/s | engine decode tok/s | served share | engine turns tok/s | "
        "share of that | engine step p50 | ITL p50 | ITL p50 / step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        e = s["engine_alone"]
        lines.append(
            f"| {s['users']} | {e['batch']} ({_fmt(s['time']['per_step']['decode_rows'], 2)}) | "
            f"{_fmt(e['served_tokens_per_s'])} | {_fmt(e['engine_tokens_per_s'])} | **{_pct(e['served_share'])}** | "
            f"{_fmt((e.get('turn_tokens_per_s') or 0) * e.get('replicas', 1))} | {_pct(e.get('served_share_of_turn_rate'))} | "
            f"{_fmt(e['step_ms_p50'], 1)} ms | {_ms(s.get('itl_p50_ms'))} | {_fmt(e.get('itl_p50_over_step'), 2)}x |"
        )
    lines.append("")
    for count, f in (baseline.get("other_threads") or {}).items():
        omp = cfg.get("replica_omp_num_threads")
        why = (f" (the OMP_NUM_THREADS Ray sets in a replica reserving {cfg['replica_cpus']:g} CPU)"
               if omp is not None and str(omp) == str(count) and cfg.get("replica_cpus") is not None else "")
        lines += [
            f"With {count} torch thread(s){why} instead, the engine alone at batch "
            f"{f['batch']} decodes {_fmt(f['decode_tokens_per_s'])} tok/s ({_fmt(f['step_ms_p50'])} ms a step; "
            f"whole turns {_fmt(f['turn_tokens_per_s'])} tok/s).",
            "",
        ]
    again = baseline.get("measured_again")
    if again:
        lines += [f"Engine-alone figures measured again on {again['date']} (`{again['command']}`), the stack not "
                  f"started again{': ' + again['note'] if again.get('note') else '.'}", ""]
    if baseline.get("by_batch"):
        loads = [f.get("loadavg_1m") for f in baseline["by_batch"].values() if f.get("loadavg_1m") is not None]
        if loads:
            lines += [f"Machine load average while the baseline ran: {min(loads):g}–{max(loads):g} (1 min).", ""]
    lines += [
        "Targets (issue 17): served at least 60% of the engine alone at the same batch; inter-token p50 at most "
        "2x the engine's step time at that batch. A step below saturation serves what its users ask for "
        "(think time bounds the demand), so its share says little; the saturated steps measure the stack.",
        "",
    ]
    return lines


def _time_lines(run: dict[str, Any]) -> list[str]:
    steps = [s for s in run["steps"] if (s.get("time") or {}).get("measured")]
    if not steps:
        return []
    head = " | ".join(str(s["users"]) for s in steps)
    sep = "|".join("---:" for _ in steps)
    lines = [
        "### Where the time goes",
        "",
        "From the replicas' load reports (cumulative counters, sampled every 2 s), their deltas over each step's "
        "measured window (after warm-up). The engine thread's parts add up to its wall time (less the loop's "
        "own bookkeeping, the unaccounted row); turn phases are means over the turns that finished in the "
        "window. Columns: concurrent chats.",
        "",
        f"| engine thread, share of wall time | {head} |",
        f"|---|{sep}|",
    ]
    for key, label in ENGINE_PARTS.items():
        lines.append(f"| {label} | " + " | ".join(_pct(s["time"]["engine_share"].get(key)) for s in steps) + " |")
    lines.append("| unaccounted | " + " | ".join(_pct(s["time"].get("unaccounted_share")) for s in steps) + " |")
    lines += ["", f"| per engine step | {head} |", f"|---|{sep}|"]
    for key, label in (("steps_per_s", "steps / s"), ("decode_rows", "decode rows"),
                       ("prefill_tokens", "prefill tokens"), ("step_ms", "ms per step (engine.step)"),
                       ("forward_ms", "of which forward, ms"), ("deliver_ms", "handing tokens on, ms")):
        lines.append(f"| {label} | " + " | ".join(_fmt(s["time"]["per_step"].get(key), 2) for s in steps) + " |")
    lines += ["", f"| per turn (mean) | {head} |", f"|---|{sep}|"]
    for key, label in TURN_PHASES.items():
        lines.append(f"| {label} | " + " | ".join(_ms(s["time"]["per_turn_ms"].get(key)) for s in steps) + " |")
    lines.append("| turns finished in the window | " + " | ".join(str(s["time"]["turns"]) for s in steps) + " |")
    lines += ["", f"| residency moves in the window | {head} |", f"|---|{sep}|"]
    for key in MOVES:
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(s["time"]["moves"].get(key, 0)) for s in steps) + " |")
    lines.append("")
    return lines


def _profile_lines(run: dict[str, Any]) -> list[str]:
    prof = run.get("profile")
    if not prof:
        return []
    if not prof.get("ok"):
        return [f"Profile (py-spy) of the replica: not taken ({prof.get('error', 'unknown error')}).", ""]
    busy = next((s.get("replica_busy_threads") for s in run["steps"] if s["users"] == prof["users"]), None) or {}
    cpu_by_tid = {row["tid"]: row["cpu_share"] for rows in busy.values() for row in rows}
    lines = [
        "### Profile of the replica process (py-spy)",
        "",
        f"py-spy on the replica's pid during the {prof['users']}-chat step, from {prof['started_after_s']:.0f} s into "
        "it: first every thread that is not blocked in a wait (on a CPU, or waiting for the GIL), then only the "
        "thread holding the GIL. CPU share per thread is from /proc over the whole step (its user + system time "
        "over wall time).",
        "",
    ]
    for kind, heading in (("all", "all busy threads"), ("gil", "the GIL holder only")):
        rec = prof.get(kind) or {}
        if not rec.get("ok"):
            if kind == "gil" and rec:
                lines += [f"GIL profile not taken: {rec.get('error')}.", ""]
            continue
        summary = rec["summary"]
        lines += [
            f"**{heading}** (`{rec['command'].split(' -o ')[0]}`): {summary['samples']} samples = "
            f"{summary['cpu_s_sampled']} thread-seconds in {summary['seconds']:g} s.",
            "",
            "| thread | samples | share of the wall time | CPU share (/proc) |",
            "|---|---:|---:|---:|",
        ]
        for t in summary["threads"]:
            tid = t["thread"].rpartition("[")[2].rstrip("]")
            cpu = cpu_by_tid.get(int(tid)) if tid.isdigit() else None
            lines.append(f"| {t['thread']} | {t['samples']} | {_pct(t['busy_share_of_wall'])} | {_pct(cpu)} |")
        lines += ["", "Threads other than the engine loop, by what their innermost recognised frame belongs to:", "",
                  "| what | samples | share of those | share of the wall time |", "|---|---:|---:|---:|"]
        for c in summary["outside_engine_by_category"]:
            lines.append(f"| {c['what']} | {c['samples']} | {_pct(c['share_of_outside'])} | "
                         f"{_pct(c['busy_share_of_wall'])} |")
        lines += ["", "Top frames by own samples:", "", "| frame | share |", "|---|---:|"]
        for f in summary["top_own"][:10]:
            lines.append(f"| `{f['what']}` | {_pct(f['share'])} |")
        lines += ["", "Top functions including their callees:", "", "| function | share |", "|---|---:|"]
        for f in summary["top_inclusive"][:10]:
            lines.append(f"| `{f['what']}` | {_pct(f['share'])} |")
        lines.append("")
    if prof.get("finding"):
        lines += [prof["finding"], ""]
    return lines


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
        "Each run names the model's dtype and weight format and the CPU with its vector extensions (AVX2, AVX512,",
        "AVX512-BF16, VNNI, AMX: the fastest kernels differ between them, so figures compare only within one",
        "machine kind). With the local stack the report also says where the time goes (the replicas' load reports:",
        "the engine thread's time by part, per-step batch and per-turn phases, over each step's measured window",
        "after warm-up), and runs the engine alone in the load-test process at the batch each step reached, so the",
        "served rate is a share of the engine's, measured in the same run on the same machine. A sweep (several",
        "`--users`) names its saturation point: where TTFT p99 crosses half the turn deadline. The machine load",
        "average is recorded throughout: other jobs on the same cores inflate latencies and lower throughput.",
        "",
    ]
    for name, run in data.get("runs", {}).items():
        lines += _run_section(name, run)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines).rstrip() + "\n")


def _fault_lines(run: dict[str, Any]) -> list[str]:
    """The fault schedule's outcome per step (loadtest/faults.py): lost turns, failures, recovery per fault."""
    cfg = run["config"]
    if not (cfg.get("kill_replica_every_s") or cfg.get("restart_redis_at_s") is not None):
        return []
    schedule = []
    if cfg.get("kill_replica_every_s"):
        schedule.append(f"one replica killed with SIGKILL every {cfg['kill_replica_every_s']:g} s (in turn)")
    if cfg.get("restart_redis_at_s") is not None:
        schedule.append(f"redis-server killed with SIGKILL at {cfg['restart_redis_at_s']:g} s (its supervisor "
                        "restarts it from the append-only file)")
    lines = ["### Faults", "", "Schedule: " + "; ".join(schedule) + ".", ""]
    for step in run["steps"]:
        lost = step.get("lost_acknowledged_turns")
        by_code = ", ".join(f"{code} {n}" for code, n in step["failures_by_code"].items()) or "none"
        lines += [
            f"{step['users']} chats: **lost acknowledged turns: {'not counted' if lost is None else lost}** "
            f"(turns a user saw finish that the registry or a later turn's number no longer shows); "
            f"{step['turns']} turns completed, {step['failed_turns']} failed (by status: {by_code}).",
            "",
            "| fault | at | target | put right after | turns/s before | back to 80% of it after "
            "| failed turns meanwhile |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for fault in step.get("faults", []):
            fixed = fault.get("replaced_s", fault.get("restarted_s"))
            what = "replacement replica reporting" if fault["kind"] == "replica" else "redis-server answering again"
            failed = ", ".join(f"{c} {n}" for c, n in fault.get("failed_during_recovery", {}).items()) or "none"
            recovered = fault.get("recovered_s")
            back = "not within the step" if recovered is None else f"{recovered:g} s"
            put_right = "–" if fixed is None else f"{fixed:g} s ({what})"
            target = fault.get("target") or fault.get("error", "")
            lines.append(
                f"| kill -9 {fault['kind']} | {fault['at_s']:g} s | {target} | {put_right} | "
                f"{_fmt(fault.get('turns_per_s_before'), 2)} | {back} | {failed} |"
            )
        lines.append("")
    lines += [
        "Recovery: from the fault until the completed-turn rate over a 10 s window is back to 80% of its mean "
        "over the minute before the fault (from the users' own turn log).",
        "",
    ]
    return lines


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
        f"- CPU: {run['cpu']}" if run.get("cpu") else "- CPU: not recorded (this run predates the CPU line)",
        f"- stack: {cfg['target']}" + (" (users chat over the OpenAI-compatible HTTP API: Responses with the "
                                        "conversation kept, SSE)" if cfg.get("protocol") == "http" else "")
        + (f"; {cfg['replicas']} replica(s) × {cfg['slots']} KV slots" if cfg.get("replicas") else "")
        + (f", cache {cfg['sinks']} sinks + {cfg['window']} window entries per session" if cfg.get("sinks") else ""),
        f"- each turn: up to {cfg['max_tokens']} new tokens ({cfg.get('sampling', 'greedy')}), deadline {cfg['turn_timeout_s']:.0f} s; think time "
        f"{cfg['think_s'][0]:g}–{cfg['think_s'][1]:g} s; spawn rate {cfg['spawn_rate']:g} users/s",
        "",
    ]
    steps = run["steps"]
    if len(steps) > 1:
        lines += [
            "| chats | turns | turns/s | generated tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | failed (by status) "
            "| refused early | peak replica RSS | load avg |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for s in steps:
            by_code = ", ".join(f"{code} {n}" for code, n in s["failures_by_code"].items())
            refused = s.get("refused_early")
            share = s.get("refused_early_share")
            lines.append(
                f"| {s['users']} | {s['turns']} | {_fmt(_turns_per_s(s))} | {_fmt(_tokens_per_s(s))} | "
                f"{_ms(s['ttft_p50_ms'])} | {_ms(s['ttft_p99_ms'])} | {_ms(s['itl_p50_ms'])} | {_ms(s['itl_p99_ms'])} | "
                f"{s['failed_turns']}{f' ({by_code})' if by_code else ''} | "
                f"{'–' if refused is None else f'{refused} ({100 * (share or 0):.1f}%)'} | "
                f"{_mb(s['peak_replica_rss_mb'])} | {s.get('machine_load_avg') or '–'} |"
            )
        lines.append("")
        if any((s.get("window") or {}).get("measured") for s in steps):
            lines += [
                "turns/s (successful turns) and generated tok/s are over each step's measured window (after its "
                "warm-up); refused early: "
                "turns the replica refused at once (RESOURCE_EXHAUSTED) because they could not start before their "
                "deadline, as a share of the step's turns.",
                "",
            ]
        sat = saturation(steps, cfg["turn_timeout_s"])
        lines += [_saturation_line(sat, cfg["turn_timeout_s"]), ""]
        best = run.get("largest_passing_users")
        lines += [
            f"**Largest number of concurrent chats with p99 inter-token latency under 1 s and no failed turn: "
            f"{best if best is not None else 'none of the steps'}.**",
            "",
        ]
    lines += _fault_lines(run)
    lines += _engine_alone_lines(run)
    lines += _time_lines(run)
    lines += _profile_lines(run)
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
        f"| generated tokens / s (whole run) | {head['tokens_per_s']} |",
    ]
    if (head.get("window") or {}).get("measured"):
        w = head["window"]
        lines.append(f"| turns / s and generated tokens / s, measured window ({w['window_s']:.0f} s after "
                     f"{head['warmup_s']:.0f} s warm-up) | {w['turns_per_s']} / {w['tokens_per_s']} |")
    if head.get("engine_alone"):
        e = head["engine_alone"]
        lines.append(f"| served share of the engine alone at the batch reached ({e['batch']}) | "
                     f"{_pct(e['served_share'])} of {_fmt(e['engine_tokens_per_s'])} tok/s |")
    lines += [
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
        step = step_summary(old["users"], cfg["duration_s"], cfg["spawn_rate"], step_dir / "locust", tally, samples)
        for key in ("replica_busy_threads",):  # measured live from /proc, not in the raw files
            if key in old:
                step[key] = old[key]
        steps.append(step)
    run["steps"] = steps
    if (run.get("engine_alone") or {}).get("by_batch"):
        for step in steps:
            attach_engine_alone(step, run["engine_alone"])
    passing = [s["users"] for s in steps if passes_itl_target(s)]
    run["largest_passing_users"] = max(passing) if passing else None
    run["headline"] = steps[headline_index(steps, run["largest_passing_users"])]
    run["saturation"] = saturation(steps, cfg["turn_timeout_s"])


def replot(name: str, run: dict[str, Any], docs_dir: Path, root: Path) -> None:
    """Draw a run's plots again: the sweep and where-the-time-goes plots from its entry, the timeline from its
    raw output when that is on this machine. The run's image list is kept in step."""
    steps = run["steps"]
    label = run["config"]["model"].split(" (")[0]
    images = []
    raw = root / run["results_dir"]
    headline = run["headline"]
    step_dir = raw if len(steps) == 1 else raw / f"u{headline['users']}"
    timeline = docs_dir / "img" / f"loadtest_{name}.png"
    if (step_dir / "locust_stats_history.csv").exists():
        plot_timeline(step_dir / "locust", read_csv(step_dir / "replicas.csv"),
                      f"{name}: {headline['users']} endless chats ({label})", timeline)
    if timeline.exists():
        images.append(f"img/{timeline.name}")
    if len(steps) > 1:
        sweep = plot_sweep(steps, f"{name}: against concurrent chats ({label})",
                           docs_dir / "img" / f"loadtest_{name}_sweep.png", run["config"]["turn_timeout_s"])
        images.insert(0, f"img/{sweep.name}")
    where = plot_time(steps, f"{name}: where the time goes (measured window of each step)",
                      docs_dir / "img" / f"loadtest_{name}_time.png")
    if where is not None:
        images.insert(1 if len(steps) > 1 else 0, f"img/{where.name}")
    run["images"] = images


def main(argv: list[str] | None = None) -> None:
    """Re-render docs/loadtest.md from docs/loadtest.json, optionally setting a run's note first."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loadtest.report", description=main.__doc__)
    parser.add_argument("--docs-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--note", nargs=2, metavar=("RUN", "TEXT"), help="set the note printed above RUN's figures")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute every run's figures and plots from its raw files in loadtest/results/ "
                             "first (runs whose raw files are not on this machine are kept as they are)")
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
            replot(name, run, args.docs_dir, root)
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
