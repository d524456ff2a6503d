"""Where each session's cache lives: a KV slot, host memory (parked), or nowhere (to be rebuilt).

Pure bookkeeping, no torch: the engine moves the tensors, this module decides. It is the only record of
residency in the process (the replica asks the engine and never keeps a copy), so a caller cancelled halfway
through a load can never leave a slot that nobody knows about.

- Slots are handed out lowest first (contiguous slots let attention slice the slab instead of gathering).
- Resident sessions are kept in least-recently-used order; when a slot is needed and none is free, the least
  recently used *idle* one is parked: its cache is copied to host memory, bit for bit.
- Parked caches are bounded by a byte budget; past it the least recently used parked cache is dropped and its
  session forgotten (it is rebuilt from its transcript when it comes back).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sinkserve.errors import NoFreeSlot


@dataclass
class ResidencyStats:
    parks: int = 0  # idle caches moved to host memory
    unparks: int = 0  # parked caches copied back into a slot (never a re-prefill)
    drops: int = 0  # parked caches discarded for the host budget


@dataclass
class _Parked:
    state: Any  # opaque to this module: the engine's exported slot
    nbytes: int


class Residency:
    def __init__(self, slots: int, host_budget_bytes: int):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.host_budget_bytes = host_budget_bytes
        self._free = list(range(slots))
        heapq.heapify(self._free)
        self._resident: OrderedDict[str, int] = OrderedDict()  # session -> slot, least recently used first
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self.host_bytes = 0
        self.stats = ResidencyStats()

    # ---- queries
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def slot(self, session_id: str) -> int | None:
        return self._resident.get(session_id)

    def is_resident(self, session_id: str) -> bool:
        return session_id in self._resident

    def is_parked(self, session_id: str) -> bool:
        return session_id in self._parked

    def resident(self) -> list[str]:
        return list(self._resident)

    def parked(self) -> list[str]:
        return list(self._parked)

    def owner_of(self, slot: int) -> str | None:
        return next((sid for sid, held in self._resident.items() if held == slot), None)

    # ---- changes
    def touch(self, session_id: str) -> None:
        """Mark a resident session as just used (last to be parked)."""
        if session_id in self._resident:
            self._resident.move_to_end(session_id)

    def take_slot(self, session_id: str) -> int:
        if session_id in self._resident:
            raise ValueError(f"session {session_id!r} already holds slot {self._resident[session_id]}")
        if not self._free:
            raise NoFreeSlot(f"all {self.slots} KV slots are in use")
        slot = heapq.heappop(self._free)
        self._resident[session_id] = slot
        return slot

    def victim(self, is_busy: Callable[[str], bool]) -> str | None:
        """The least recently used resident session that is idle, or None when every one is busy."""
        return next((sid for sid in self._resident if not is_busy(sid)), None)

    def park(self, session_id: str, state: Any, nbytes: int) -> list[str]:
        """Move a resident session's cache to host memory and free its slot. Returns the sessions whose parked
        caches were dropped to stay within the host budget (possibly this one, if it alone exceeds it)."""
        self._release_slot(session_id)
        self._parked[session_id] = _Parked(state, nbytes)
        self.host_bytes += nbytes
        self.stats.parks += 1
        dropped = []
        while self.host_bytes > self.host_budget_bytes and self._parked:
            oldest = next(iter(self._parked))
            self._drop_parked(oldest)
            self.stats.drops += 1
            dropped.append(oldest)
        return dropped

    def unpark(self, session_id: str) -> tuple[int, Any]:
        """Give a parked session a slot; returns (slot, its parked state) for the engine to copy back."""
        if session_id not in self._parked:
            raise KeyError(session_id)
        slot = self.take_slot(session_id)  # raises NoFreeSlot before anything changes
        parked = self._drop_parked(session_id)
        self.stats.unparks += 1
        return slot, parked.state

    def forget(self, session_id: str) -> int | None:
        """Remove a session wherever it is; returns the slot it freed, if it held one."""
        if session_id in self._parked:
            self._drop_parked(session_id)
            return None
        if session_id in self._resident:
            return self._release_slot(session_id)
        return None

    def _release_slot(self, session_id: str) -> int:
        slot = self._resident.pop(session_id)
        heapq.heappush(self._free, slot)
        return slot

    def _drop_parked(self, session_id: str) -> _Parked:
        parked = self._parked.pop(session_id)
        self.host_bytes -= parked.nbytes
        return parked
