"""Faults injected into a load run, and what they cost.

``FaultInjector`` runs beside Locust during a step of a local-stack run: every ``kill_replica_every_s`` it
kills one replica process with SIGKILL (the replicas in turn, by the pid their load reports carry; Ray Serve
starts a replacement), and at ``restart_redis_at_s`` it kills redis-server with SIGKILL (the stack's
supervisor starts it again on the same port and data directory, from its append-only file). Each fault is
recorded with what it hit and when the stack had put it right:

- replica: ``replaced_s``, until a load report from a new replica process appears;
- redis: ``restarted_s``, until redis-server answers PING again;
- both: ``recovered_s``, until the completed-turn rate (10 s windows, sliding by 1 s) is back to 80% of its
  mean over the minute before the fault, from the users' own turn log (``turn_log`` in Locust's tally).

``analyse`` adds the failed turns by status within each fault's recovery and the turns/s series the plot
draws; lost acknowledged turns come from the users' own checks (the locustfile counts a turn lost when the
registry or a later turn's number shows fewer turns than the user saw finish).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RECOVERY_WINDOW_S = 10.0
RECOVERY_SHARE = 0.8
BASELINE_S = 60.0


@dataclass
class FaultPlan:
    kill_replica_every_s: float | None = None
    restart_redis_at_s: float | None = None

    @property
    def any(self) -> bool:
        return bool(self.kill_replica_every_s) or self.restart_redis_at_s is not None

    def times(self, duration_s: float) -> list[tuple[float, str]]:
        """(seconds into the step, kind) of every fault that falls inside the step, in order."""
        planned = []
        if self.kill_replica_every_s:
            at = self.kill_replica_every_s
            while at < duration_s:
                planned.append((at, "replica"))
                at += self.kill_replica_every_s
        if self.restart_redis_at_s is not None and self.restart_redis_at_s < duration_s:
            planned.append((self.restart_redis_at_s, "redis"))
        return sorted(planned)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(eq=False)  # a Thread must stay hashable
class FaultInjector(threading.Thread):
    """Injects the plan's faults into the local stack during one step (see the module docstring)."""

    plan: FaultPlan
    duration_s: float
    replica_rows: Callable[[], list[dict]]  # the sampler's load-report rows so far
    redis_pid: Callable[[], int | None]
    redis_ping: Callable[[], bool]
    events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self._halt = threading.Event()
        self._killed: set[int] = set()
        self._next_victim = 0
        self.started_unix = time.time()
        self._watchers: list[threading.Thread] = []

    def run(self) -> None:
        started = self.started_unix = time.time()
        for at, kind in self.plan.times(self.duration_s):
            if self._halt.wait(max(0.0, started + at - time.time())):
                return
            event = self._replica_fault() if kind == "replica" else self._redis_fault()
            self.events.append(event)
            # Watched beside the schedule: a slow recovery must not delay the next fault.
            watcher = threading.Thread(target=self._watch, args=(event,), name="fault-watch", daemon=True)
            watcher.start()
            self._watchers.append(watcher)

    def _live_replicas(self) -> dict[str, int]:
        """{replica id: pid} of the replicas whose latest report names a live process."""
        latest: dict[str, int] = {}
        for row in self.replica_rows():
            if row.get("pid") and row.get("replica_id"):
                latest[row["replica_id"]] = int(row["pid"])
        return {r: pid for r, pid in latest.items() if pid not in self._killed and _alive(pid)}

    def _replica_fault(self) -> dict:
        live = sorted(self._live_replicas().items())
        event: dict[str, Any] = {"kind": "replica", "unix_s": time.time()}
        if not live:
            event["error"] = "no live replica to kill (no load report with a live pid)"
            return event
        replica, pid = live[self._next_victim % len(live)]
        self._next_victim += 1
        os.kill(pid, signal.SIGKILL)
        self._killed.add(pid)
        event.update(target=replica, pid=pid, known_before=sorted(r for r, _ in live))
        return event

    def _redis_fault(self) -> dict:
        event: dict[str, Any] = {"kind": "redis", "unix_s": time.time()}
        pid = self.redis_pid()
        if not pid:
            event["error"] = "redis-server has no pid"
            return event
        os.kill(pid, signal.SIGKILL)
        event.update(target="redis-server", pid=pid)
        return event

    def _watch(self, event: dict, timeout_s: float = 120.0) -> None:
        """Waits (in the background of the step) until the fault is put right; records how long it took."""
        if "error" in event:
            return
        deadline = event["unix_s"] + timeout_s
        while time.time() < deadline and not self._halt.is_set():
            if event["kind"] == "replica":
                fresh = [r for r, pid in self._live_replicas().items() if r not in event["known_before"]]
                if fresh:
                    event["replaced_by"] = fresh[0]
                    event["replaced_s"] = round(time.time() - event["unix_s"], 1)
                    return
            elif self.redis_ping():
                new_pid = self.redis_pid()
                if new_pid and new_pid != event["pid"]:
                    event["restarted_s"] = round(time.time() - event["unix_s"], 1)
                    event["new_pid"] = new_pid
                    return
            self._halt.wait(0.25)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(10)
        for watcher in self._watchers:
            watcher.join(10)
        return self.events


def completion_rate(turn_log: list[list], start: float, end: float, window_s: float = RECOVERY_WINDOW_S,
                    stride_s: float = 1.0) -> list[tuple[float, float, float]]:
    """[(window end, completed turns/s, failed turns/s)] over [start, end] in sliding windows."""
    ok = sorted(t for t, code in turn_log if code == "OK")
    bad = sorted(t for t, code in turn_log if code != "OK")
    series, at = [], start + window_s
    import bisect

    while at <= end:
        n_ok = bisect.bisect_right(ok, at) - bisect.bisect_right(ok, at - window_s)
        n_bad = bisect.bisect_right(bad, at) - bisect.bisect_right(bad, at - window_s)
        series.append((at, n_ok / window_s, n_bad / window_s))
        at += stride_s
    return series


def analyse(events: list[dict], turn_log: list[list], step_start: float, step_end: float) -> dict:
    """Per fault: the completed-turn rate before it, how long until it was back (recovered_s, None if it never
    was within the step), and the turns that failed, by status, from the fault until then."""
    series = completion_rate(turn_log, step_start, step_end)
    faults = []
    for event in events:
        out = dict(event)
        fault_at = event["unix_s"]
        out["at_s"] = round(fault_at - step_start, 1)  # on the plot's time axis
        before = [t for t, code in turn_log if code == "OK" and fault_at - BASELINE_S <= t < fault_at]
        span = min(BASELINE_S, fault_at - step_start)
        rate_before = len(before) / span if span > 0 else None
        out["turns_per_s_before"] = None if rate_before is None else round(rate_before, 2)
        recovered_at = None
        if rate_before:
            for at, rate, _ in series:
                if at - RECOVERY_WINDOW_S >= fault_at and rate >= RECOVERY_SHARE * rate_before:
                    recovered_at = at - RECOVERY_WINDOW_S  # the window that starts there is back to the rate
                    break
        out["recovered_s"] = None if recovered_at is None else round(recovered_at - fault_at, 1)
        until = recovered_at if recovered_at is not None else step_end
        failed = Counter(code for t, code in turn_log if code != "OK" and fault_at <= t <= until + RECOVERY_WINDOW_S)
        out["failed_during_recovery"] = dict(failed)
        faults.append(out)
    return {"faults": faults, "series": [(round(t - step_start, 1), round(r, 3), round(f, 3)) for t, r, f in series]}


def plot(analysis: dict, title: str, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = analysis["series"]
    fig, ax = plt.subplots(figsize=(10, 4))
    if series:
        times = [t for t, _, _ in series]
        ax.plot(times, [r for _, r, _ in series], label="completed turns/s (10 s window)", color="tab:blue")
        ax.plot(times, [f for _, _, f in series], label="failed turns/s", color="tab:red", alpha=0.7)
    for fault in analysis["faults"]:
        at = fault.get("at_s")
        if at is None:
            continue
        color = "tab:purple" if fault["kind"] == "replica" else "tab:orange"
        ax.axvline(at, color=color, linestyle="--", alpha=0.8)
        label = f"kill -9 {fault.get('target', fault['kind'])}"
        if fault.get("recovered_s") is not None:
            label += f"\nrecovered {fault['recovered_s']:g} s"
        ax.text(at, ax.get_ylim()[1] * 0.95, label, rotation=90, va="top", ha="right", fontsize=7, color=color)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("turns/s")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
