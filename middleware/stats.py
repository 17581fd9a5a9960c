"""In-process routing counters for ``GET /ops/store``.

``RoutingStats`` counts, per domain, backend calls by outcome, fallbacks, secondary-write
failures and skips, and write-backs. The counts are this process's own since it started (each
gunicorn worker keeps its own); Prometheus (``relay/metrics.py``) is where totals across
processes live.

It is not a ``StoreObserver`` of its own: the routed stores report to ``StoreMetrics``, which
queues each event once and, when it folds its queue, hands the events to ``count`` as well
(``StoreMetrics.add_fold_listener``). ``snapshot`` asks for a fold first (``refresh``), so a read
sees every event reported before it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from middleware.observer import ERROR, OK, REJECTED, TIMEOUT

#: The counter increments of a fold that ``RoutingStats`` counts (``relay.metrics`` instrument names).
_COUNTED = frozenset({"fallbacks", "secondary_failures", "secondary_skipped", "writebacks"})


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
    """Counts what the routed stores reported, per domain, for this process.

    ``refresh``: called before every read to hand over what is still queued (``StoreMetrics.fold``).
    """

    def __init__(self, refresh: Callable[[], None] = lambda: None) -> None:
        self._refresh = refresh
        self._lock = threading.Lock()
        self._domains: dict[str, _DomainCounts] = {}

    def _counts(self, domain: str) -> _DomainCounts:
        counts = self._domains.get(domain)
        if counts is None:
            counts = self._domains[domain] = _DomainCounts()
        return counts

    def count(self, calls: Mapping[tuple[str, str, str, str], Sequence[float]],
              increments: Mapping[tuple[str, tuple[str, ...]], int]) -> None:
        """Count one fold's events (``relay.metrics.FoldListener``): the calls' seconds per
        ``(domain, backend, op, outcome)``, and the counter increments of fallbacks, mirror failures
        and skips, and write-backs."""
        with self._lock:
            for (domain, backend, _, outcome), samples in calls.items():
                tally = self._counts(domain).operations.setdefault(backend, {})
                tally[outcome] = tally.get(outcome, 0) + len(samples)
            for (instrument, labels), n in increments.items():
                if instrument not in _COUNTED:
                    continue
                counts = self._counts(labels[0])
                if instrument == "fallbacks":
                    counts.fallbacks[labels[2]] = counts.fallbacks.get(labels[2], 0) + n
                elif instrument == "secondary_failures":
                    counts.secondary_failures += n
                elif instrument == "secondary_skipped":
                    counts.secondary_skipped += n
                elif instrument == "writebacks":
                    counts.writeback[labels[1]] = counts.writeback.get(labels[1], 0) + n

    def snapshot(self, domain: str) -> dict[str, Any]:
        """The counts of one domain (zeros when nothing was reported yet)."""
        self._refresh()
        with self._lock:
            counts = self._domains.get(domain) or _DomainCounts()
            return counts.as_dict()
