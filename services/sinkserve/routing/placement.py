"""Where a session runs: keep it on a live owner, else the least-loaded replica under a bounded-load cap.

Pure functions over ``{replica: (sessions owned, load report or None)}`` as ``Replicas.loads`` returns it:
no Ray, no Redis, so every rule here is tested on plain data.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:  # annotations only: placement must not import the store's Redis client
    from sinkserve.store.replicas import LoadReport

Loads = Mapping[str, "tuple[int, LoadReport | None]"]


def is_draining(report: LoadReport | None) -> bool:
    return bool(report and report.draining)


def keeps_owner(owner: str, loads: Loads) -> bool:
    """The session stays where it is: its owner is among the live replicas and not draining."""
    return owner in loads and not is_draining(loads[owner][1])


def load_cap(owned: Iterable[int], load_factor: float) -> int:
    """Bounded load: the most sessions a replica may own after one more is placed (factor x the mean)."""
    counts = list(owned)
    return math.ceil(load_factor * (sum(counts) + 1) / len(counts))


def pick_replica(session_id: str, loads: Loads, load_factor: float) -> str | None:
    """Least-loaded replica (by sessions owned) among those under the bounded-load cap.

    Draining replicas are never chosen. Ties go to the rendezvous-hash order of the session, so two routers
    that see the same loads make the same choice.
    """
    eligible = {rid: owned for rid, (owned, report) in loads.items() if not is_draining(report)}
    if not eligible:
        return None
    cap = load_cap(eligible.values(), load_factor)

    def queue(rid: str) -> int:
        report = loads[rid][1]
        return report.queue if report else 0

    def rendezvous(rid: str) -> str:
        return hashlib.sha1(f"{session_id}/{rid}".encode()).hexdigest()

    under_cap = [rid for rid, owned in eligible.items() if owned + 1 <= cap] or list(eligible)
    return min(under_cap, key=lambda rid: (eligible[rid], queue(rid), rendezvous(rid)))
