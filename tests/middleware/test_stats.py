"""RoutingStats: per-process counts for ``/ops/store``, handed over by the store metrics' fold."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from middleware.observer import ERROR, OK, REJECTED, TIMEOUT
from middleware.stats import RoutingStats
from relay.metrics import FOLD_BATCH, StoreMetrics
from tests.support.helpers import race


def counted() -> tuple[StoreMetrics, RoutingStats]:
    """Store metrics and the routing counts that follow them, wired as the app wires them."""
    metrics = StoreMetrics(CollectorRegistry())
    stats = RoutingStats(refresh=metrics.fold)
    metrics.add_fold_listener(stats.count)
    return metrics, stats


def test_calls_fallbacks_mirror_events_and_write_backs_are_counted_when_read() -> None:
    metrics, stats = counted()
    metrics.fallback("audit", "get", "read")
    metrics.fallback("audit", "set", "write")
    metrics.fallback("audit", "get", "read")
    metrics.secondary_skipped("audit", "set")
    metrics.secondary_failure("audit", "set")
    metrics.writeback("audit", "written")
    metrics.writeback("audit", "written")
    metrics.operation("audit", "redis", "get", OK, 0.001)
    metrics.operation("audit", "redis", "set", TIMEOUT, 0.25)
    metrics.operation("audit", "memory", "set", OK, 0.0001)
    metrics.operation("locale", "redis", "get", ERROR, 0.001)

    audit = stats.snapshot("audit")

    assert audit["operations"] == {"redis": {OK: 1, TIMEOUT: 1}, "memory": {OK: 1}}
    assert (audit["ok"], audit["timeouts"], audit["errors"]) == (2, 1, 0)
    assert audit["fallbacks"] == {"read": 2, "write": 1}
    assert (audit["secondarySkipped"], audit["secondaryFailures"]) == (1, 1)
    assert audit["writeBack"] == {"written": 2}
    assert stats.snapshot("locale")["errors"] == 1
    assert stats.snapshot("machines")["operations"] == {}


def test_a_full_queue_is_counted_without_a_read() -> None:
    metrics = StoreMetrics(CollectorRegistry())
    stats = RoutingStats()  # no refresh: only the metrics' own folds hand events over
    metrics.add_fold_listener(stats.count)
    for _ in range(FOLD_BATCH - 1):
        metrics.operation("audit", "memory", "get", OK, 0.0001)
    assert stats.snapshot("audit")["ok"] == 0
    metrics.operation("audit", "memory", "get", OK, 0.0001)
    assert stats.snapshot("audit")["ok"] == FOLD_BATCH


def test_no_call_is_lost_between_threads() -> None:
    metrics, stats = counted()
    per_thread = 3 * FOLD_BATCH + 7

    def report(_: int) -> None:
        for _ in range(per_thread):
            metrics.operation("inflight", "memory", "get", OK, 0.0001)

    race(8, report)
    assert stats.snapshot("inflight")["ok"] == 8 * per_thread


def test_a_refused_call_counts_as_a_rejection_a_fallback_a_memory_call_and_a_skipped_mirror() -> None:
    metrics, stats = counted()
    metrics.refused("audit", "redis", "set", "write", 0.0001, True)
    metrics.refused("audit", "redis", "set", "write", 0.0001, True)
    metrics.refused("audit", "redis", "get", "read", 0.0001, False)
    metrics.operation("audit", "memory", "get", OK, 0.0001)

    audit = stats.snapshot("audit")

    assert audit["operations"] == {"redis": {REJECTED: 3}, "memory": {OK: 4}}
    assert (audit["ok"], audit["rejected"]) == (4, 3)
    assert audit["fallbacks"] == {"read": 1, "write": 2}
    assert audit["secondarySkipped"] == 2
