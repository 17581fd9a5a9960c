"""RoutingStats: per-process counts for ``/ops/store``, queued per call and counted on read."""
from __future__ import annotations

from middleware.observer import ERROR, OK, REJECTED, TIMEOUT
from middleware.stats import FOLD_BATCH, RoutingStats
from tests.support.helpers import race


def test_calls_and_fallbacks_are_counted_when_read() -> None:
    stats = RoutingStats()
    stats.fallback("audit", "get", "read")
    stats.fallback("audit", "set", "write")
    stats.fallback("audit", "get", "read")
    stats.secondary_skipped("audit", "set")
    stats.operation("audit", "redis", "get", OK, 0.001)
    stats.operation("audit", "redis", "set", TIMEOUT, 0.25)
    stats.operation("audit", "memory", "set", OK, 0.0001)
    stats.operation("locale", "redis", "get", ERROR, 0.001)

    audit = stats.snapshot("audit")

    assert audit["operations"] == {"redis": {OK: 1, TIMEOUT: 1}, "memory": {OK: 1}}
    assert (audit["ok"], audit["timeouts"], audit["errors"]) == (2, 1, 0)
    assert audit["fallbacks"] == {"read": 2, "write": 1}
    assert audit["secondarySkipped"] == 1
    assert stats.snapshot("locale")["errors"] == 1


def test_a_full_queue_is_counted_without_a_read() -> None:
    stats = RoutingStats()
    for _ in range(FOLD_BATCH):
        stats.operation("audit", "memory", "get", OK, 0.0001)
    assert not stats._queue
    stats.operation("audit", "memory", "get", OK, 0.0001)
    assert len(stats._queue) == 1
    assert stats.snapshot("audit")["ok"] == FOLD_BATCH + 1


def test_no_call_is_lost_between_threads() -> None:
    stats = RoutingStats()
    per_thread = 3 * FOLD_BATCH + 7

    def report(_: int) -> None:
        for _ in range(per_thread):
            stats.operation("inflight", "memory", "get", OK, 0.0001)

    race(8, report)
    assert stats.snapshot("inflight")["ok"] == 8 * per_thread


def test_a_refused_call_counts_as_a_rejection_a_fallback_a_memory_call_and_a_skipped_mirror() -> None:
    stats = RoutingStats()
    stats.refused("audit", "redis", "set", "write", 0.0001, True)
    stats.refused("audit", "redis", "set", "write", 0.0001, True)
    stats.refused("audit", "redis", "get", "read", 0.0001, False)
    stats.operation("audit", "memory", "get", OK, 0.0001)

    audit = stats.snapshot("audit")

    assert audit["operations"] == {"redis": {REJECTED: 3}, "memory": {OK: 4}}
    assert (audit["ok"], audit["rejected"]) == (4, 3)
    assert audit["fallbacks"] == {"read": 1, "write": 2}
    assert audit["secondarySkipped"] == 2
