"""MemoryLedger: byte accounting of one tier, FIFO reservations, peaks and loud failures.

Thread tests use events and short joins, never long sleeps: the whole file runs in about a second.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from klotski_jax.constants import BudgetError
from klotski_jax.planning.policy import PolicyError
from klotski_jax.runtime.ledger import MemoryLedger

SETTLE_S = 0.1  # long enough for a waiter that could proceed to do so


def _waiter(ledger: MemoryLedger, place, done: list, errors: list) -> threading.Thread:
    """A thread that waits on an enqueued place and records its key when served."""
    def run() -> None:
        try:
            ledger.wait(place)
            done.append(place[1])
        except BudgetError as e:  # reported by the assertions of each test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(cond, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


# ---- accounting -----------------------------------------------------------------------------

def test_reserve_release_accounting():
    led = MemoryLedger("device", 100)
    assert (led.used, led.peak, led.free) == (0, 0, 100)
    led.reserve("a", 30)
    led.reserve(("expert", 0, 1), 50)
    assert (led.used, led.free) == (80, 20)
    assert led.holds("a") and led.holds(("expert", 0, 1)) and not led.holds("b")
    assert led.held() == {"a": 30, ("expert", 0, 1): 50}
    assert led.release("a") == 30
    assert (led.used, led.free) == (50, 50)
    assert not led.holds("a")
    assert led.release(("expert", 0, 1)) == 50
    assert (led.used, led.free) == (0, 100)
    assert led.held() == {}


def test_held_is_a_copy():
    led = MemoryLedger("host", 10)
    led.reserve("a", 1)
    snapshot = led.held()
    snapshot["b"] = 5
    assert led.held() == {"a": 1} and led.used == 1


def test_exactly_the_capacity_fits_and_zero_bytes_are_fine():
    led = MemoryLedger("device", 100)
    led.reserve("all", 100)
    assert led.free == 0
    led.reserve("nothing", 0)
    assert led.used == 100
    assert not led.try_reserve("one more", 1)


def test_peak_is_the_high_water_mark():
    led = MemoryLedger("device", 100)
    led.reserve("a", 30)
    led.reserve("b", 50)
    assert led.peak == 80
    led.release("a")
    assert (led.used, led.peak) == (50, 80)
    led.reserve("c", 10)
    assert (led.used, led.peak) == (60, 80)
    led.reserve("d", 40)
    assert (led.used, led.peak) == (100, 100)
    for k in ("b", "c", "d"):
        led.release(k)
    assert (led.used, led.peak) == (0, 100)


def test_unlimited_capacity():
    led = MemoryLedger("host", None)
    assert led.free is None
    led.reserve("huge", 10**15)
    assert led.try_reserve("huger", 10**16)
    assert led.used == 10**15 + 10**16 == led.peak
    led.release("huge")
    assert led.used == 10**16 and led.free is None


# ---- loud failures --------------------------------------------------------------------------

def test_budget_error_is_a_policy_error():
    assert issubclass(BudgetError, PolicyError) and issubclass(BudgetError, ValueError)


@pytest.mark.parametrize("how", ["reserve", "enqueue"])
def test_larger_than_capacity_raises_at_once_with_the_numbers(how):
    led = MemoryLedger("device", 100, timeout_s=30)
    led.reserve("a", 10)
    t0 = time.monotonic()
    with pytest.raises(BudgetError) as err:
        getattr(led, how)("big", 150)
    assert time.monotonic() - t0 < 1.0, "must not wait for a reservation that can never fit"
    msg = str(err.value)
    assert "150" in msg and "100" in msg and "device" in msg and "big" in msg
    # Nothing was queued or taken: the ledger still serves others without delay.
    assert led.used == 10 and led.held() == {"a": 10}
    assert led.try_reserve("small", 90)


def test_negative_reservation_raises():
    led = MemoryLedger("device", None)
    with pytest.raises(BudgetError, match="negative"):
        led.reserve("a", -1)
    assert led.try_reserve("b", 1)


def test_double_reserve_raises():
    led = MemoryLedger("device", 100)
    led.reserve("a", 10)
    with pytest.raises(BudgetError, match="already reserved"):
        led.reserve("a", 10)
    with pytest.raises(BudgetError, match="already reserved"):
        led.try_reserve("a", 10)
    assert led.used == 10 and led.held() == {"a": 10}
    # The failed reserve left no place in the queue behind.
    assert led.try_reserve("b", 10)


def test_release_of_unknown_key_raises():
    led = MemoryLedger("host", 100)
    with pytest.raises(BudgetError, match="holds nothing"):
        led.release("ghost")
    led.reserve("a", 5)
    led.release("a")
    with pytest.raises(BudgetError, match="holds nothing"):
        led.release("a")  # a double release
    assert led.used == 0


# ---- FIFO service ---------------------------------------------------------------------------

def test_a_reservation_waits_until_a_release_makes_room():
    led = MemoryLedger("device", 100, timeout_s=5)
    led.reserve("a", 70)
    done, errors = [], []
    t = _waiter(led, led.enqueue("b", 50), done, errors)
    t.join(SETTLE_S)
    assert done == [] and led.used == 70
    led.release("a")
    t.join(5)
    assert done == ["b"] and not errors
    assert led.held() == {"b": 50}


def test_fifo_big_before_small_even_when_small_fits():
    led = MemoryLedger("device", 100, timeout_s=5)
    led.reserve("a", 60)
    big = led.enqueue("big", 80)  # does not fit until "a" goes
    small = led.enqueue("small", 30)  # fits right now (60 + 30 <= 100), but is queued behind big
    done, errors = [], []
    t_small = _waiter(led, small, done, errors)
    t_big = _waiter(led, big, done, errors)
    t_small.join(SETTLE_S)
    assert done == [] and led.used == 60, "the small reservation jumped the queue"

    led.release("a")  # big fits now; small (80 + 30 > 100) must keep waiting
    assert _until(lambda: done == ["big"])
    t_small.join(SETTLE_S)
    assert done == ["big"] and led.used == 80

    led.release("big")
    t_small.join(5)
    t_big.join(5)
    assert done == ["big", "small"] and not errors
    assert led.held() == {"small": 30} and led.peak == 80


def test_fifo_serves_many_waiters_in_enqueue_order():
    led = MemoryLedger("device", 10, timeout_s=5)
    led.reserve("gate", 10)
    places = [led.enqueue(f"r{i}", 10) for i in range(5)]
    done, errors = [], []
    threads = [_waiter(led, p, done, errors) for p in reversed(places)]  # start in reverse
    for i in range(5):
        led.release("gate" if i == 0 else f"r{i - 1}")
        assert _until(lambda i=i: len(done) == i + 1)
    for t in threads:
        t.join(5)
    assert done == [f"r{i}" for i in range(5)] and not errors
    assert led.peak == 10


def test_try_reserve_refuses_while_others_are_queued():
    led = MemoryLedger("device", 100, timeout_s=5)
    place = led.enqueue("first", 10)
    assert not led.try_reserve("second", 1), "try_reserve must not overtake a queued reservation"
    assert not led.holds("second")
    led.wait(place)
    assert led.try_reserve("second", 1)
    assert led.held() == {"first": 10, "second": 1}
    assert not led.try_reserve("third", 90)  # does not fit
    assert led.used == 11


def test_enqueue_takes_the_place_at_enqueue_time():
    """A reservation enqueued first is served first even if its wait starts later."""
    led = MemoryLedger("device", 100, timeout_s=5)
    led.reserve("a", 100)
    early = led.enqueue("early", 100)
    done, errors = [], []
    t_late = _waiter(led, led.enqueue("late", 100), done, errors)
    led.release("a")
    t_late.join(SETTLE_S)
    assert done == [], "late was served before the earlier place"
    led.wait(early)  # this thread waits only now, and is still first
    done.append("early")
    led.release("early")
    t_late.join(5)
    assert done == ["early", "late"] and not errors


# ---- a stuck schedule fails loudly ----------------------------------------------------------

def test_stuck_wait_times_out_naming_the_holders():
    led = MemoryLedger("host", 100, timeout_s=0.2)
    led.reserve(("staging", 1), 60)
    led.reserve("dense", 30)
    t0 = time.monotonic()
    with pytest.raises(BudgetError) as err:
        led.reserve(("expert", 3, 7), 20)
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 3
    msg = str(err.value)
    assert "stuck" in msg and "host" in msg and "0.2s" in msg
    assert "('expert', 3, 7)" in msg and "20 bytes" in msg
    assert "90 of 100" in msg and "('staging', 1)" in msg and "'dense'" in msg
    # The timed-out place left the queue: later reservations are not blocked behind it.
    assert led.held() == {("staging", 1): 60, "dense": 30}
    assert led.try_reserve("small", 10)


def test_a_timed_out_head_unblocks_the_ones_behind_it():
    led = MemoryLedger("device", 100, timeout_s=0.4)
    led.reserve("a", 90)
    head = led.enqueue("head", 50)  # can never fit while "a" is held: will time out
    behind = led.enqueue("behind", 10)  # fits, but is queued behind head
    done, errors = [], []

    def late_waiter() -> None:  # starts waiting well after head, so its own deadline is later
        time.sleep(0.2)
        _waiter(led, behind, done, errors).join(5)

    t = threading.Thread(target=late_waiter, daemon=True)
    t.start()
    with pytest.raises(BudgetError, match="stuck"):
        led.wait(head)
    t.join(5)
    assert done == ["behind"] and not errors
    assert led.held() == {"a": 90, "behind": 10}


# ---- invariants under concurrency -----------------------------------------------------------

def test_concurrent_reservations_never_exceed_the_capacity():
    capacity = 1000
    led = MemoryLedger("device", capacity, timeout_s=10)
    over: list[int] = []
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        rng = random.Random(w)
        try:
            for i in range(60):
                key = (w, i)
                if rng.random() < 0.3:
                    if not led.try_reserve(key, rng.randint(1, 400)):
                        continue
                else:
                    led.reserve(key, rng.randint(0, 400))
                if led.used > capacity:
                    over.append(led.used)
                led.release(key)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not over
    assert led.used == 0 and led.held() == {}
    assert 0 < led.peak <= capacity


def test_two_places_for_one_key_never_hold_it_twice():
    """A second place for a key already taken while it waited raises instead of double-counting."""
    led = MemoryLedger("device", 100, timeout_s=5)
    led.reserve("blocker", 100)
    first, second = led.enqueue("k", 10), led.enqueue("k", 10)
    done, errors = [], []
    t = _waiter(led, second, done, errors)  # starts waiting while "k" is not held yet
    t.join(SETTLE_S)
    led.release("blocker")
    led.wait(first)
    t.join(5)
    assert done == [] and len(errors) == 1 and "already reserved" in str(errors[0])
    assert led.held() == {"k": 10} and led.used == 10


def test_abort_wakes_waiters_with_an_error():
    """Tearing down a failed run must not hang on loads that wait for memory."""
    ledger = MemoryLedger("device", 100, timeout_s=60)
    ledger.reserve("a", 100)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            ledger.reserve("b", 50)
        except BudgetError as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    start = time.perf_counter()
    ledger.abort()
    t.join(5)
    assert not t.is_alive() and time.perf_counter() - start < 5
    assert errors and "aborted" in str(errors[0])
