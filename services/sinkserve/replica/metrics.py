"""Prometheus metrics of a replica, through Ray's metrics API (exported by every Ray node's metrics endpoint).

Residency counts (parks, unparks, drops) are the engine's own; they are published from each heartbeat's engine
snapshot, so the replica keeps no second count of them.
"""

from __future__ import annotations

from sinkserve.replica.loop import EngineSnapshot, LoopTotals

ENGINE_PARTS = ("forward_s", "sample_s", "output_s", "step_other_s", "deliver_s", "commands_s", "idle_s")
TURN_PHASES = ("queue_s", "first_token_s", "decode_s", "commit_s")
TURN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

COUNTERS = (
    ("parks", "idle sessions whose cache moved to host memory"),
    ("unparks", "parked sessions copied back into a slot"),
    ("drops", "parked caches dropped for the host-memory budget"),
    ("rebuilds", "sessions rebuilt from their transcript"),
    ("refused_early", "turns refused at once because they could not start before their deadline"),
)


class ReplicaMetrics:
    def __init__(self, replica_id: str):
        self.tags = {"replica": replica_id}
        self._published = dict.fromkeys((name for name, _ in COUNTERS), 0)
        self._engine_published = LoopTotals()
        try:
            from ray.util import metrics
        except ImportError:  # pragma: no cover - the replica always runs with Ray installed
            self._sessions = None
            return
        keys = ("replica",)
        self._sessions = metrics.Gauge(
            "sinkserve_replica_sessions", "sessions on this replica by state", tag_keys=("replica", "state")
        )
        self._free = metrics.Gauge("sinkserve_replica_free_slots", "free KV slab slots", tag_keys=keys)
        self._waiting = metrics.Gauge("sinkserve_replica_waiting_turns", "turns waiting for a slot", tag_keys=keys)
        self._counters = {
            name: metrics.Counter(f"sinkserve_replica_{name}_total", help_text, tag_keys=keys)
            for name, help_text in COUNTERS
        }
        self._engine_seconds = metrics.Counter(
            "sinkserve_replica_engine_seconds_total", "engine thread time by part (forward, sample, output, ...)",
            tag_keys=("replica", "part"),
        )
        self._step_work = metrics.Counter(
            "sinkserve_replica_step_rows_total", "what the engine's steps held: decode rows and prefill tokens",
            tag_keys=("replica", "kind"),
        )
        self._engine_info = metrics.Gauge(
            "sinkserve_replica_engine_info", "1, labelled with the dtype, weights and kernels the engine chose at "
            "start and the CPU's torch capability", tag_keys=("replica", "dtype", "weights", "device",
                                                             "cpu_capability", "threads"),
        )
        self._turn_phase = metrics.Histogram(
            "sinkserve_replica_turn_phase_seconds", "time a turn spent in each phase (queue, first token, decode, "
            "commit)", boundaries=list(TURN_BUCKETS_S), tag_keys=("replica", "phase"),
        )

    def engine_paths(self, paths: dict) -> None:
        """The engine's chosen execution paths as an info-style gauge (value 1, the choice in the labels)."""
        if self._sessions is None or not paths:
            return
        self._engine_info.set(1, tags={**self.tags, "dtype": paths["dtype"], "weights": paths["weights"],
                                       "device": paths["device"], "cpu_capability": paths.get("cpu_capability", ""),
                                       "threads": str(paths["threads"])})

    def count(self, name: str, value: int = 1) -> None:
        self._published[name] += value
        if self._sessions is not None and value:
            self._counters[name].inc(value, tags=self.tags)

    def counted(self, name: str) -> int:
        return self._published[name]

    def observe_turn(self, phases: dict[str, float]) -> None:
        if self._sessions is None:
            return
        for phase in TURN_PHASES:
            if phase in phases:
                self._turn_phase.observe(phases[phase], tags={**self.tags, "phase": phase.removesuffix("_s")})

    def publish(self, snapshot: EngineSnapshot, active: int, waiting: int) -> None:
        """Gauges from the snapshot, and the counters moved on by what the engine counted since."""
        for name in ("parks", "unparks", "drops"):
            self.count(name, getattr(snapshot, name) - self._published[name])
        totals, before = snapshot.totals, self._engine_published
        self._engine_published = totals
        if self._sessions is None:
            return
        for part in ENGINE_PARTS:
            delta = getattr(totals, part) - getattr(before, part)
            if delta > 0:
                self._engine_seconds.inc(delta, tags={**self.tags, "part": part.removesuffix("_s")})
        for kind in ("decode_rows", "prefill_tokens"):
            delta = getattr(totals, kind) - getattr(before, kind)
            if delta > 0:
                self._step_work.inc(delta, tags={**self.tags, "kind": kind})
        for state, value in (("resident", snapshot.resident), ("parked", snapshot.parked), ("active", active)):
            self._sessions.set(value, tags={**self.tags, "state": state})
        self._free.set(snapshot.free_slots, tags=self.tags)
        self._waiting.set(waiting, tags=self.tags)
