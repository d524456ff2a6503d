"""Residency bookkeeping on its own (no model): slots, LRU parking, the host budget."""

import pytest

from sinkserve.engine.residency import Residency
from sinkserve.errors import NoFreeSlot


def never_busy(_sid: str) -> bool:
    return False


def test_slots_are_handed_out_lowest_first_and_reused():
    r = Residency(slots=3, host_budget_bytes=0)
    assert [r.take_slot(s) for s in "abc"] == [0, 1, 2]
    assert r.free_slots == 0
    with pytest.raises(NoFreeSlot):
        r.take_slot("d")
    assert r.forget("b") == 1
    assert r.take_slot("d") == 1
    assert r.owner_of(1) == "d" and r.slot("a") == 0 and r.slot("b") is None


def test_victim_is_the_least_recently_used_idle_session():
    r = Residency(slots=3, host_budget_bytes=100)
    for sid in "abc":
        r.take_slot(sid)
    assert r.victim(never_busy) == "a"
    r.touch("a")
    assert r.victim(never_busy) == "b"
    assert r.victim(lambda sid: sid in {"b", "c"}) == "a"
    assert r.victim(lambda sid: True) is None


def test_park_and_unpark_move_state_and_count():
    r = Residency(slots=1, host_budget_bytes=100)
    r.take_slot("a")
    assert r.park("a", state={"k": 1}, nbytes=40) == []
    assert r.free_slots == 1 and r.is_parked("a") and not r.is_resident("a") and r.host_bytes == 40
    r.take_slot("b")
    with pytest.raises(NoFreeSlot):  # no slot: nothing changes
        r.unpark("a")
    assert r.is_parked("a") and r.host_bytes == 40
    r.forget("b")
    slot, state = r.unpark("a")
    assert (slot, state) == (0, {"k": 1}) and r.host_bytes == 0 and r.is_resident("a")
    assert (r.stats.parks, r.stats.unparks, r.stats.drops) == (1, 1, 0)


def test_host_budget_drops_least_recently_parked_first():
    r = Residency(slots=3, host_budget_bytes=100)
    for sid in "abc":
        r.take_slot(sid)
    assert r.park("a", "A", 40) == []
    assert r.park("b", "B", 40) == []
    assert r.park("c", "C", 40) == ["a"]  # 120 > 100: the oldest parked cache goes
    assert r.parked() == ["b", "c"] and r.host_bytes == 80 and r.stats.drops == 1
    zero = Residency(slots=1, host_budget_bytes=0)
    zero.take_slot("x")
    assert zero.park("x", "X", 1) == ["x"]  # no host budget: parking drops at once
    assert not zero.is_parked("x") and zero.free_slots == 1


def test_forget_works_wherever_the_session_is():
    r = Residency(slots=2, host_budget_bytes=10)
    r.take_slot("a")
    r.take_slot("b")
    r.park("b", "B", 5)
    assert r.forget("b") is None and r.host_bytes == 0
    assert r.forget("a") == 0 and r.free_slots == 2
    assert r.forget("nobody") is None
