"""``GuardedBreaker``: when a caller may skip a call the breaker would refuse anyway (``refuse_now``),
and what a closed circuit does without its lock."""
from __future__ import annotations

import threading
import time

import pytest

from middleware.breaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreakerError, GuardedBreaker


def fail() -> None:
    raise ConnectionError("down")


def trip(breaker: GuardedBreaker) -> None:
    for _ in range(breaker.fail_max):
        with pytest.raises((ConnectionError, CircuitBreakerError)):
            breaker.call(fail)
    assert breaker.current_state == STATE_OPEN


def test_a_closed_breaker_refuses_nothing() -> None:
    breaker = GuardedBreaker(fail_max=2, reset_timeout=60)
    assert breaker.refuse_now() is False
    assert breaker.rejected == 0


def test_an_open_breaker_refuses_and_counts_until_its_reset_timeout() -> None:
    breaker = GuardedBreaker(fail_max=2, reset_timeout=0.2)
    trip(breaker)

    assert breaker.refuse_now() is True
    assert breaker.refuse_now() is True
    assert breaker.rejected == 2

    time.sleep(0.25)
    assert breaker.refuse_now() is False  # the next call is the half-open trial
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.current_state == STATE_CLOSED


def test_while_the_half_open_trial_runs_other_calls_are_refused() -> None:
    breaker = GuardedBreaker(fail_max=1, reset_timeout=0.05)
    trip(breaker)
    time.sleep(0.1)
    started, release = threading.Event(), threading.Event()

    def trial() -> str:
        started.set()
        release.wait(5)
        return "ok"

    runner = threading.Thread(target=breaker.call, args=(trial,))
    runner.start()
    try:
        assert started.wait(5)
        assert breaker.current_state == STATE_HALF_OPEN
        assert breaker.refuse_now() is True
        with pytest.raises(CircuitBreakerError):
            breaker.call(lambda: "second")
    finally:
        release.set()
        runner.join(5)
    assert breaker.current_state == STATE_CLOSED
    assert breaker.refuse_now() is False


def test_a_circuit_opened_again_by_a_failed_trial_refuses_for_a_whole_new_timeout() -> None:
    breaker = GuardedBreaker(fail_max=1, reset_timeout=0.5)
    trip(breaker)
    assert breaker.refuse_now() is True
    time.sleep(0.6)
    assert breaker.refuse_now() is False
    with pytest.raises((ConnectionError, CircuitBreakerError)):
        breaker.call(fail)  # the half-open trial fails: open again, from now
    assert breaker.current_state == STATE_OPEN
    reopened = time.monotonic()

    assert breaker.refuse_now() is True  # not the first opening's time, which has passed
    time.sleep(max(0.0, reopened + 0.6 - time.monotonic()))
    assert breaker.refuse_now() is False


def test_a_closed_breaker_admits_and_records_success_without_its_lock() -> None:
    breaker = GuardedBreaker(fail_max=2, reset_timeout=60)
    holding, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with breaker._lock:
            holding.set()
            release.wait(timeout=5)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert holding.wait(timeout=5)
        done = []
        caller = threading.Thread(target=lambda: done.append(breaker.call(lambda: "ok")))
        caller.start()
        caller.join(timeout=2)
        assert done == ["ok"]
    finally:
        release.set()
        holder.join(timeout=5)


def test_a_success_after_a_failure_resets_the_count_and_counts_again_from_zero() -> None:
    breaker = GuardedBreaker(fail_max=2, reset_timeout=60)
    with pytest.raises(ConnectionError):
        breaker.call(fail)
    assert breaker.fail_counter == 1
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.fail_counter == 0
    with pytest.raises(ConnectionError):
        breaker.call(fail)
    assert breaker.current_state == STATE_CLOSED
    with pytest.raises(CircuitBreakerError):
        breaker.call(fail)
    assert breaker.current_state == STATE_OPEN
