"""Byte accounting of one memory tier, with FIFO reservations and a peak.

Every buffer the pipeline keeps on the device (or in host RAM) is reserved here before it exists
and released when it is dropped, so `used <= capacity` holds at every moment and `peak` is the
true high-water mark of what the schedule held.

Reservations are served strictly in the order they were asked for. The schedules issue loads in
the order compute consumes them, so FIFO service means a later prefetch can never take the space
an earlier load (the one compute is waiting for) needs: the pipeline cannot deadlock on memory.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Hashable

from klotski_jax.constants import BudgetError


class MemoryLedger:
    """Reservations of one tier ("device" or "host") against an optional byte capacity."""

    def __init__(self, tier: str, capacity: int | None, *, timeout_s: float = 120.0) -> None:
        self.tier = tier
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._held: dict[Hashable, int] = {}
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._queue: collections.deque[int] = collections.deque()
        self._tickets = itertools.count()
        self._aborted = False

    @property
    def used(self) -> int:
        return self._used

    @property
    def parts(self) -> tuple[MemoryLedger, ...]:
        """The per-device ledgers behind this one: itself (`DeviceLedgers` has one per device)."""
        return (self,)

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - self._used

    @property
    def waiting(self) -> bool:
        """Whether a reservation is queued (issued, not yet granted its memory)."""
        return bool(self._queue)

    def holds(self, key: Hashable) -> bool:
        return key in self._held

    def held(self) -> dict[Hashable, int]:
        with self._cond:
            return dict(self._held)

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self._used + nbytes <= self.capacity

    def _take(self, key: Hashable, nbytes: int) -> None:
        self._held[key] = nbytes
        self._used += nbytes
        self._peak = max(self._peak, self._used)

    def reserve(self, key: Hashable, nbytes: int) -> None:
        """Reserve nbytes under key, waiting (FIFO) until earlier reservations fit and this does."""
        self.wait(self.enqueue(key, nbytes))

    def enqueue(self, key: Hashable, nbytes: int) -> tuple[int, Hashable, int]:
        """Take a place in the FIFO now (e.g. when a load is issued); `wait` on it later."""
        if nbytes < 0:
            raise BudgetError(f"{self.tier}: negative reservation {nbytes} for {key}")
        if self.capacity is not None and nbytes > self.capacity:
            raise BudgetError(f"{self.tier}: {key} needs {nbytes} bytes, more than the whole "
                              f"budget of {self.capacity} bytes")
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            return ticket, key, nbytes

    def wait(self, place: tuple[int, Hashable, int]) -> None:
        """Block until the enqueued reservation is at the head of the FIFO and fits; take it."""
        ticket, key, nbytes = place
        with self._cond:
            try:
                if key in self._held:
                    raise BudgetError(f"{self.tier}: {key} is already reserved")
                ok = self._cond.wait_for(
                    lambda: self._aborted or (self._queue[0] == ticket and self._fits(nbytes)),
                    self.timeout_s)
                if self._aborted:
                    raise BudgetError(f"{self.tier}: run aborted while {key} waited for memory")
                if not ok:
                    raise BudgetError(
                        f"{self.tier}: waited {self.timeout_s:g}s for {nbytes} bytes for {key}; "
                        f"{self._used} of {self.capacity} bytes held by {len(self._held)} buffers "
                        f"({self._held}): the schedule is stuck")
                if key in self._held:  # taken by another place of the same key while we waited
                    raise BudgetError(f"{self.tier}: {key} is already reserved")
                self._take(key, nbytes)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def abort(self) -> None:
        """Wake every waiting reservation with an error (the run is being torn down)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def try_reserve(self, key: Hashable, nbytes: int) -> bool:
        """Reserve without waiting; False if it does not fit now or others are queued first."""
        with self._cond:
            if key in self._held:
                raise BudgetError(f"{self.tier}: {key} is already reserved")
            if self._queue or not self._fits(nbytes):
                return False
            self._take(key, nbytes)
            return True

    def release(self, key: Hashable) -> int:
        """Release key's reservation; returns its bytes."""
        with self._cond:
            try:
                nbytes = self._held.pop(key)
            except KeyError:
                raise BudgetError(f"{self.tier}: release of {key}, which holds nothing") from None
            self._used -= nbytes
            self._cond.notify_all()
            return nbytes


class DeviceLedgers:
    """The device ledgers of a mesh, one per device, used as one where a buffer is replicated.

    Replicated buffers (dense weights, KV caches, activations, globals) are reserved in every
    device's ledger; a routed expert only in its device's (`parts[d]`). A reservation of all
    devices takes its place in every FIFO at once, and the schedule issues every load from one
    thread in one order, so every FIFO serves loads in the same relative order: waiting for
    the devices one after the other cannot deadlock. `used` and `peak` are the largest
    device's, the figure a per-device budget bounds.
    """

    def __init__(self, tier: str, capacity: int | None, devices: int, *,
                 timeout_s: float = 120.0) -> None:
        self.tier = tier
        self.capacity = capacity
        self.parts: tuple[MemoryLedger, ...] = tuple(
            MemoryLedger(f"{tier} {d}", capacity, timeout_s=timeout_s) for d in range(devices))

    @property
    def used(self) -> int:
        return max(p.used for p in self.parts)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.parts)

    @property
    def peaks(self) -> list[int]:
        return [p.peak for p in self.parts]

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else min(p.free for p in self.parts)

    @property
    def waiting(self) -> bool:
        return any(p.waiting for p in self.parts)

    def holds(self, key: Hashable) -> bool:
        return any(p.holds(key) for p in self.parts)

    def held(self) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        for d, p in enumerate(self.parts):
            out.update({(d, k): n for k, n in p.held().items()})
        return out

    def reserve(self, key: Hashable, nbytes: int) -> None:
        self.wait(self.enqueue(key, nbytes))

    def enqueue(self, key: Hashable, nbytes: int) -> list[tuple[int, Hashable, int]]:
        return [p.enqueue(key, nbytes) for p in self.parts]

    def wait(self, places: list[tuple[int, Hashable, int]]) -> None:
        for p, place in zip(self.parts, places):
            p.wait(place)

    def abort(self) -> None:
        for p in self.parts:
            p.abort()

    def try_reserve(self, key: Hashable, nbytes: int) -> bool:
        """Reserve on every device without waiting, or on none."""
        done = []
        for p in self.parts:
            if not p.try_reserve(key, nbytes):
                for q in done:
                    q.release(key)
                return False
            done.append(p)
        return True

    def release(self, key: Hashable) -> int:
        return [p.release(key) for p in self.parts][0]


def device_ledger(tier: str, capacity: int | None, devices: int) -> MemoryLedger | DeviceLedgers:
    """The ledger of a tier on `devices` devices: one `MemoryLedger`, or a `DeviceLedgers` with
    one per device of a mesh (each with the whole capacity: budgets are per device)."""
    return MemoryLedger(tier, capacity) if devices == 1 else DeviceLedgers(tier, capacity, devices)
