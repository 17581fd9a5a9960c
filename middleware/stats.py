"""In-process routing counters for ``GET /ops/store``, and a fan-out to several observers.

``RoutingStats`` is a ``StoreObserver`` that counts, per domain, backend calls by
outcome, fallbacks, secondary-write failures and skips, and write-backs. The counts
are this process's own since it started (each gunicorn worker keeps its own);
Prometheus (``relay/metrics.py``) is where totals across processes live.
``FanoutObserver`` hands every report to each observer it wraps, so these counters
and the metrics can watch the same routed stores.
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Optional

from middleware.observer import ERROR, OK, REJECTED, TIMEOUT, StoreObserver, drain

#: Events queued before they are counted without a read.
FOLD_BATCH = 512
#: Queue markers (in a backend's place) of a fallback and of a skipped mirror write; no backend has
#: these names.
_FALLBACK = "<fallback>"
_SKIPPED = "<skipped>"


class _DomainCounts:
    def __init__(self) -> None:
        self.operations: dict[str, dict[str, int]] = {}
        self.fallbacks = {"read": 0, "write": 0}
        self.secondary_failures = 0
        self.secondary_skipped = 0
        self.writeback: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        def total(outcome: str) -> int:
            return sum(outcomes.get(outcome, 0) for outcomes in self.operations.values())

        return {
            "operations": {backend: dict(outcomes) for backend, outcomes in self.operations.items()},
            "ok": total(OK), "errors": total(ERROR), "timeouts": total(TIMEOUT), "rejected": total(REJECTED),
            "fallbacks": dict(self.fallbacks),
            "secondaryFailures": self.secondary_failures,
            "secondarySkipped": self.secondary_skipped,
            "writeBack": dict(self.writeback),
        }


class RoutingStats:
    """Counts what the routed stores report, per domain, for this process.

    A backend call, fallback, skipped mirror write or refused call is only queued (``deque.append``
    needs no lock): there are some 20 per callback. A queue is counted when it reaches
    ``FOLD_BATCH`` events and before every read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._domains: dict[str, _DomainCounts] = {}
        #: ``(domain, backend, outcome)`` of a call, ``(domain, _FALLBACK, kind)`` of a fallback and
        #: ``(domain, _SKIPPED, "")`` of a skipped mirror write.
        self._queue: deque[tuple[str, str, str]] = deque()
        #: ``(domain, backend, kind, mirror_skipped)`` of a call memory served because the backend
        #: refused it.
        self._refusals: deque[tuple[str, str, str, bool]] = deque()

    def _counts(self, domain: str) -> _DomainCounts:
        counts = self._domains.get(domain)
        if counts is None:
            counts = self._domains[domain] = _DomainCounts()
        return counts

    # -- StoreObserver ----------------------------------------------------------------------------
    def operation(self, domain: str, backend: str, op: str, outcome: str, seconds: float) -> None:
        self._enqueue((domain, backend, outcome))

    def fallback(self, domain: str, op: str, kind: str) -> None:
        """Queued like a call: during an outage every store call falls back."""
        self._enqueue((domain, _FALLBACK, kind))

    def secondary_skipped(self, domain: str, op: str) -> None:
        """Queued: during an outage every mirrored write is skipped."""
        self._enqueue((domain, _SKIPPED, ""))

    def refused(self, domain: str, backend: str, op: str, kind: str, seconds: float, mirror_skipped: bool) -> None:
        """Queued once, counted as a rejected call, a fallback, a memory call and maybe a skipped
        mirror write."""
        refusals = self._refusals
        refusals.append((domain, backend, kind, mirror_skipped))
        if len(refusals) >= FOLD_BATCH:
            self._fold()

    def _enqueue(self, event: tuple[str, str, str]) -> None:
        queue = self._queue
        queue.append(event)
        if len(queue) >= FOLD_BATCH:
            self._fold()

    def _fold(self) -> None:
        """Count the queued events: equal ones together (``Counter`` tallies them in C), then each
        distinct event once. Events queued meanwhile wait for the next fold."""
        with self._lock:
            events = Counter(drain(self._queue))
            for (domain, backend, kind, mirror_skipped), n in Counter(drain(self._refusals)).items():
                events[domain, backend, REJECTED] += n
                events[domain, _FALLBACK, kind] += n
                events[domain, "memory", OK] += n
                if mirror_skipped:
                    events[domain, _SKIPPED, ""] += n
            for (domain, backend, outcome), n in events.items():
                counts = self._counts(domain)
                if backend == _SKIPPED:
                    counts.secondary_skipped += n
                    continue
                tally = counts.fallbacks if backend == _FALLBACK else counts.operations.setdefault(backend, {})
                tally[outcome] = tally.get(outcome, 0) + n

    def secondary_failure(self, domain: str, op: str) -> None:
        with self._lock:
            self._counts(domain).secondary_failures += 1

    def shadow(self, domain: str, outcome: str, key: Optional[str] = None, detail: Optional[str] = None) -> None:
        """Shadow results are counted by the ``ShadowComparer`` itself (``router.describe()``)."""

    def writeback(self, domain: str, outcome: str) -> None:
        with self._lock:
            writeback = self._counts(domain).writeback
            writeback[outcome] = writeback.get(outcome, 0) + 1

    # -- reading ----------------------------------------------------------------------------------
    def snapshot(self, domain: str) -> dict[str, Any]:
        """The counts of one domain (zeros when nothing was reported yet)."""
        self._fold()
        with self._lock:
            counts = self._domains.get(domain) or _DomainCounts()
            return counts.as_dict()


class FanoutObserver:
    """Reports every event to each of ``observers`` in order."""

    def __init__(self, observers: Sequence[StoreObserver]) -> None:
        self.observers = tuple(observers)

    def operation(self, domain: str, backend: str, op: str, outcome: str, seconds: float) -> None:
        for observer in self.observers:
            observer.operation(domain, backend, op, outcome, seconds)

    def fallback(self, domain: str, op: str, kind: str) -> None:
        for observer in self.observers:
            observer.fallback(domain, op, kind)

    def refused(self, domain: str, backend: str, op: str, kind: str, seconds: float, mirror_skipped: bool) -> None:
        for observer in self.observers:
            observer.refused(domain, backend, op, kind, seconds, mirror_skipped)

    def secondary_failure(self, domain: str, op: str) -> None:
        for observer in self.observers:
            observer.secondary_failure(domain, op)

    def secondary_skipped(self, domain: str, op: str) -> None:
        for observer in self.observers:
            observer.secondary_skipped(domain, op)

    def shadow(self, domain: str, outcome: str, key: Optional[str] = None, detail: Optional[str] = None) -> None:
        for observer in self.observers:
            observer.shadow(domain, outcome, key, detail)

    def writeback(self, domain: str, outcome: str) -> None:
        for observer in self.observers:
            observer.writeback(domain, outcome)
