"""A pybreaker circuit breaker that does not serialize the calls it guards.

pybreaker 1.4's ``CircuitBreaker.call`` holds the breaker's lock for the whole
guarded call (danielfm/pybreaker issue 55), so one breaker in front of Redis
would let one request talk to Redis at a time. ``GuardedBreaker`` keeps
pybreaker's states, storage, ``fail_max``/``reset_timeout``/``success_threshold``
and listeners, but takes the lock only to admit a call and to record its
outcome, and not even then while the circuit is closed and nothing fails; the
call itself runs unlocked.

Half-open: exactly one trial call runs at a time; every other call fails fast
with ``CircuitBreakerError`` until the trial has closed or re-opened the circuit.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, Optional, TypeVar

import pybreaker
from pybreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreakerError

from relay.locks import compute_lock

T = TypeVar("T")

__all__ = [
    "CircuitBreakerError",
    "GuardedBreaker",
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "StateChangeListener",
]


class GuardedBreaker(pybreaker.CircuitBreaker):
    """``pybreaker.CircuitBreaker`` whose lock covers state changes only, never the call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trial_running = False
        self._rejected = 0
        #: Counts only, so not pybreaker's reentrant lock, and the OS thread's lock also under gevent
        #: (``refuse_now`` runs for every refused call).
        self._rejected_lock = compute_lock()
        self._reopen_cache: Optional[tuple[Optional[datetime], float]] = None

    # -- what telemetry reads --------------------------------------------------------------
    @property
    def state_name(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``."""
        return self.current_state

    @property
    def rejected(self) -> int:
        """Calls refused without running (open circuit, or a half-open trial already running)."""
        return self._rejected

    def refuse_now(self) -> bool:
        """Count and return ``True`` when a call made now would be refused without running: the
        circuit is open and its reset timeout has not passed, or it is half-open with the trial
        call running. Lets a caller with somewhere else to go skip building a call that cannot run.
        Once the timeout has passed it returns ``False``, so the next call goes through ``call`` and
        becomes the half-open trial."""
        storage = self._state_storage
        state = storage.state
        if state == STATE_HALF_OPEN:
            if not self._trial_running:
                return False
        elif state != STATE_OPEN:
            return False
        elif time.time() >= self._reopen_at(storage.opened_at):
            return False
        with self._rejected_lock:
            self._rejected += 1
        return True

    def count_rejected(self, calls: int) -> None:
        """Count ``calls`` refused by a caller that ``refuse_now`` had already told so."""
        with self._rejected_lock:
            self._rejected += calls

    def _reopen_at(self, opened_at: Optional[datetime]) -> float:
        """Epoch seconds when the open circuit lets a trial through (``-inf`` when it has no time).
        Cached per opening: during an outage every store call asks."""
        cached = self._reopen_cache
        if cached is None or cached[0] is not opened_at:
            reopen_at = -math.inf if opened_at is None else (
                opened_at + timedelta(seconds=self.reset_timeout)).timestamp()
            cached = self._reopen_cache = (opened_at, reopen_at)
        return cached[1]

    # -- guarded calls ---------------------------------------------------------------------
    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        trial = self._admit(func, args, kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._record_failure(exc, trial)
            raise
        self._record_success(trial)
        return result

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        trial = self._admit(None, (), {})
        try:
            yield
        except BaseException as exc:
            self._record_failure(exc, trial)
            raise
        self._record_success(trial)

    # -- state bookkeeping, each step under the lock ----------------------------------------
    def _state_name(self) -> str:
        """What pybreaker's ``state`` property does (sync the cached state object with the
        storage, notifying listeners when it moved), with fewer lookups on the hot path."""
        name = self._state_storage.state
        if name != self._state.name:
            self.state = name  # type: ignore[assignment]
        return name

    def _admit(self, func: Any, args: tuple, kwargs: dict) -> bool:
        """Let a call through or raise ``CircuitBreakerError``; ``True`` for the half-open trial.
        A closed circuit admits without the lock: nothing changes, and a call admitted just as
        another's failure opens the circuit is one that came a moment earlier."""
        if self._state_storage.state == STATE_CLOSED and self._state.name == STATE_CLOSED:
            for listener in self._listeners:
                listener.before_call(self, func, *args, **kwargs)
            return False
        with self._lock:
            name = self._state_name()
            if name == STATE_OPEN:
                if time.time() < self._reopen_at(self._state_storage.opened_at):
                    with self._rejected_lock:
                        self._rejected += 1
                    raise CircuitBreakerError("Timeout not elapsed yet, circuit breaker still open")
                self.half_open()
                name = STATE_HALF_OPEN
            trial = False
            if name == STATE_HALF_OPEN:
                if self._trial_running:
                    with self._rejected_lock:
                        self._rejected += 1
                    raise CircuitBreakerError("Trial call running, circuit breaker half-open")
                self._trial_running = trial = True
            for listener in self._listeners:
                listener.before_call(self, func, *args, **kwargs)
            return trial

    def _record_success(self, trial: bool) -> None:
        """Under the lock, unless the circuit is closed with no failure counted: then there is
        nothing to reset or count."""
        storage = self._state_storage
        if not trial and storage.counter == 0 and storage.state == STATE_CLOSED:
            for listener in self._listeners:
                listener.success(self)
            return
        with self._lock:
            if trial:
                self._trial_running = False
            self._state_storage.reset_counter()
            if trial and self._state_name() == STATE_HALF_OPEN:
                self._state_storage.increment_success_counter()
                if self._state_storage.success_counter >= self.success_threshold:
                    self.close()
            for listener in self._listeners:
                listener.success(self)

    def _record_failure(self, exc: BaseException, trial: bool) -> None:
        """Count a failure; when it trips the circuit, raise ``CircuitBreakerError`` from it
        (pybreaker's ``throw_new_error_on_trip``)."""
        if not self.is_system_error(exc):
            self._record_success(trial)
            return
        with self._lock:
            if trial:
                self._trial_running = False
            self._inc_counter()
            for listener in self._listeners:
                listener.failure(self, exc)
            name = self._state_name()
            if trial and name == STATE_HALF_OPEN:
                message = "Trial call failed, circuit breaker opened"
            elif name == STATE_CLOSED and self._state_storage.counter >= self.fail_max:
                message = "Failures threshold reached, circuit breaker opened"
            else:
                return
            if self.open():
                raise CircuitBreakerError(message) from exc


class StateChangeListener(pybreaker.CircuitBreakerListener):
    """Adapts a plain function ``(breaker_name, old_state, new_state)`` to pybreaker's listener API."""

    def __init__(self, callback: Callable[[Optional[str], Optional[str], str], None]) -> None:
        self._callback = callback

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: Optional[pybreaker.CircuitBreakerState],
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._callback(cb.name, old_state.name if old_state else None, new_state.name)

