"""Prometheus metrics of a replica, through Ray's metrics API (exported by every Ray node's metrics endpoint).

Residency counts (parks, unparks, drops) are the engine's own; they are published from each heartbeat's engine
snapshot, so the replica keeps no second count of them.
"""

from __future__ import annotations

from sinkserve.replica.loop import EngineSnapshot

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

    def count(self, name: str, value: int = 1) -> None:
        self._published[name] += value
        if self._sessions is not None and value:
            self._counters[name].inc(value, tags=self.tags)

    def publish(self, snapshot: EngineSnapshot, active: int, waiting: int) -> None:
        """Gauges from the snapshot, and the residency counters moved on by what the engine counted since."""
        for name in ("parks", "unparks", "drops"):
            self.count(name, getattr(snapshot, name) - self._published[name])
        if self._sessions is None:
            return
        for state, value in (("resident", snapshot.resident), ("parked", snapshot.parked), ("active", active)):
            self._sessions.set(value, tags={**self.tags, "state": state})
        self._free.set(snapshot.free_slots, tags=self.tags)
        self._waiting.set(waiting, tags=self.tags)
