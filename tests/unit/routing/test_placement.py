"""Placement rules on plain data: no Ray, no Redis."""

from __future__ import annotations

import subprocess
import sys

from sinkserve.routing.placement import is_draining, keeps_owner, load_cap, pick_replica
from sinkserve.store.replicas import LoadReport


def test_bounded_load_placement():
    loads = {"a": (10, None), "b": (2, None), "c": (2, LoadReport("c", draining=True))}
    assert pick_replica("s1", loads, 1.25) == "b"  # least loaded; draining never chosen
    even = {"a": (5, None), "b": (5, None)}
    picks = {pick_replica(f"s{i}", even, 1.25) for i in range(50)}
    assert picks == {"a", "b"}  # ties spread by the session's rendezvous hash
    assert pick_replica("s", {"a": (0, LoadReport("a", draining=True))}, 1.25) is None


def test_the_same_loads_give_every_router_the_same_choice():
    loads = {"a": (3, None), "b": (3, None), "c": (3, None)}
    assert len({pick_replica("one-session", dict(loads), 1.25) for _ in range(10)}) == 1


def test_queue_depth_breaks_ties_between_equally_owned_replicas():
    loads = {"a": (2, LoadReport("a", queue=5)), "b": (2, LoadReport("b", queue=1))}
    assert pick_replica("s", loads, 1.25) == "b"


def test_load_cap_is_factor_times_the_mean_after_placing():
    assert load_cap([4, 4], 1.25) == 6  # ceil(1.25 * 9 / 2)
    assert load_cap([0], 1.0) == 1
    assert load_cap([10, 0, 0, 0], 1.0) == 3


def test_an_owner_keeps_its_session_until_it_drains_or_leaves():
    loads = {"a": (1, None), "b": (1, LoadReport("b", draining=True))}
    assert keeps_owner("a", loads)
    assert not keeps_owner("b", loads)  # draining
    assert not keeps_owner("gone", loads)  # not among the running replicas
    assert not keeps_owner("", loads)  # no owner yet
    assert is_draining(LoadReport("x", draining=True)) and not is_draining(None)


def test_placement_imports_neither_ray_nor_redis():
    code = (
        "import sys, sinkserve.routing.placement\n"
        "print(','.join(sorted(m for m in ('ray', 'redis', 'torch', 'grpc') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
