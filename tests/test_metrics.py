"""``StoreMetrics`` on a fresh registry: instruments, the rolling per-domain window, logs, key counts."""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from config.phases import PRESETS
from middleware.breaker import GuardedBreaker
from relay.metrics import FOLD_BATCH, LATENCY_BUCKETS, KeyCardinality, StoreMetrics
from relay.stores.base import StoreUnavailable
from relay.stores.memory import MemoryStore
from relay.telemetry import JsonFormatter, request_id

DOMAINS = ("idempotency", "machines", "inflight", "audit", "templates", "ratelimit", "locale")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: Clock) -> StoreMetrics:
    return StoreMetrics(registry, clock=clock)


@pytest.fixture
def store_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logger = logging.getLogger("relay")
    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="relay.store")
    try:
        yield caplog
    finally:
        logger.propagate = propagate


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


# -- Prometheus instruments ----------------------------------------------------------------------
def test_latency_histogram_has_sub_millisecond_buckets(metrics: StoreMetrics, registry: CollectorRegistry) -> None:
    metrics.operation("idempotency", "memory", "get", "ok", 0.00008)
    metrics.fold()

    bucket = "relay_store_operation_seconds_bucket"
    labels = {"backend": "memory", "domain": "idempotency", "op": "get", "outcome": "ok"}
    bounds = sorted(float(s.labels["le"]) for family in registry.collect() for s in family.samples
                    if s.name == bucket)
    assert [b for b in bounds if b < 0.001] == [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005]
    assert value(registry, bucket, **labels, le="5e-05") == 0
    assert value(registry, bucket, **labels, le="0.0001") == 1
    assert value(registry, "relay_store_operation_seconds_count", **labels) == 1


def test_folded_calls_expose_exactly_what_one_observe_per_call_would(
    metrics: StoreMetrics, registry: CollectorRegistry
) -> None:
    rng = random.Random(7)
    calls = [(rng.choice(DOMAINS), rng.choice(("memory", "redis")), rng.choice(("get", "set", "incr")), "ok",
              rng.choice(LATENCY_BUCKETS + (0.0,)) if rng.random() < 0.2 else rng.uniform(0, 1.5))
             for _ in range(3000)]
    # refused calls take no time: label sets whose samples are all zero
    calls += [(rng.choice(DOMAINS), "redis", rng.choice(("get", "set")), "rejected", 0.0) for _ in range(300)]
    expected = CollectorRegistry()
    histogram = Histogram("relay_store_operation_seconds", "x", ["backend", "domain", "op", "outcome"],
                          buckets=LATENCY_BUCKETS, registry=expected)
    for domain, backend, op, outcome, seconds in calls:
        metrics.operation(domain, backend, op, outcome, seconds)
        histogram.labels(backend, domain, op, outcome).observe(seconds)
    metrics.fold()

    def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): round(s.value, 9) for family in reg.collect()
                for s in family.samples if s.name.startswith("relay_store_operation_seconds")
                and not s.name.endswith("_created")}

    assert samples(registry) == samples(expected)
    assert sum(v for (name, _), v in samples(registry).items() if name.endswith("_count")) == len(calls)


def test_queued_calls_reach_the_histogram_on_read_or_after_a_batch(
    metrics: StoreMetrics, registry: CollectorRegistry
) -> None:
    count = "relay_store_operation_seconds_count"
    labels = {"backend": "memory", "domain": "audit", "op": "get", "outcome": "ok"}
    metrics.operation("audit", "memory", "get", "ok", 0.0001)
    assert value(registry, count, **labels) == 0
    assert b'relay_store_operation_seconds_count{backend="memory",domain="audit",op="get",outcome="ok"} 1.0' \
        in metrics.exposition()

    for _ in range(FOLD_BATCH):
        metrics.operation("audit", "memory", "get", "ok", 0.0001)
    assert value(registry, count, **labels) == 1 + FOLD_BATCH
    metrics.operation("audit", "memory", "get", "ok", 0.0001)
    assert value(registry, count, **labels) == 1 + FOLD_BATCH


def test_the_background_fold_publishes_an_idle_processs_last_calls(
    metrics: StoreMetrics, registry: CollectorRegistry
) -> None:
    metrics.operation("audit", "memory", "get", "ok", 0.0001)
    metrics.start(interval_s=0.01)
    try:
        deadline = time.monotonic() + 5
        while value(registry, "relay_store_operation_seconds_count", backend="memory", domain="audit",
                    op="get", outcome="ok") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        metrics.stop()
    assert value(registry, "relay_store_operation_seconds_count", backend="memory", domain="audit",
                 op="get", outcome="ok") == 1


@pytest.mark.parametrize(("call", "sample", "labels"), [
    (lambda m: m.operation("machines", "redis", "get", "error", 0.01),
     "relay_store_errors_total", {"backend": "redis", "domain": "machines", "op": "get", "outcome": "error"}),
    (lambda m: m.operation("machines", "redis", "get", "rejected", 0.0),
     "relay_store_errors_total", {"backend": "redis", "domain": "machines", "op": "get", "outcome": "rejected"}),
    (lambda m: m.operation("machines", "redis", "set", "timeout", 0.25),
     "relay_store_timeouts_total", {"backend": "redis", "domain": "machines", "op": "set"}),
    (lambda m: m.fallback("inflight", "get", "read"),
     "relay_store_fallbacks_total", {"domain": "inflight", "op": "get", "kind": "read"}),
    (lambda m: m.secondary_failure("audit", "set"),
     "relay_store_secondary_write_failures_total", {"domain": "audit", "op": "set"}),
    (lambda m: m.secondary_skipped("audit", "set"),
     "relay_store_secondary_writes_skipped_total", {"domain": "audit", "op": "set"}),
    (lambda m: m.shadow("locale", "missing", "sha256:0123456789abcdef"),
     "relay_store_shadow_comparisons_total", {"domain": "locale", "outcome": "missing"}),
    (lambda m: m.writeback("templates", "written"),
     "relay_store_writebacks_total", {"domain": "templates", "outcome": "written"}),
])
def test_each_observer_call_increments_its_counter(
    metrics: StoreMetrics, registry: CollectorRegistry, call: Any, sample: str, labels: dict[str, str]
) -> None:
    call(metrics)
    call(metrics)
    metrics.fold()

    assert value(registry, sample, **labels) == 2


def test_successful_calls_count_no_error_or_timeout(metrics: StoreMetrics, registry: CollectorRegistry) -> None:
    metrics.operation("machines", "redis", "get", "ok", 0.001)
    metrics.fold()

    assert all(s.value == 0 for family in registry.collect() for s in family.samples
               if s.name in ("relay_store_errors_total", "relay_store_timeouts_total"))


def test_retries_follow_the_backend_counters(metrics: StoreMetrics, registry: CollectorRegistry) -> None:
    counters = {"retries": 2, "timeouts": 0}
    metrics.watch_retries("redis", lambda: counters)
    assert value(registry, "relay_store_retries_total", backend="redis") == 2

    counters["retries"] = 5
    metrics.operation("audit", "redis", "get", "ok", 0.002)
    assert value(registry, "relay_store_retries_total", backend="redis") == 2
    metrics.fold()
    assert value(registry, "relay_store_retries_total", backend="redis") == 5

    counters["retries"] = 6
    metrics.sync()
    assert value(registry, "relay_store_retries_total", backend="redis") == 6


def test_breaker_transitions_are_counted_gauged_and_logged(
    metrics: StoreMetrics, registry: CollectorRegistry, store_logs: pytest.LogCaptureFixture
) -> None:
    breaker = GuardedBreaker(fail_max=1, reset_timeout=60, name="redis")
    metrics.watch_breaker(breaker)
    assert value(registry, "relay_store_breaker_state") == 0

    breaker.open()
    assert value(registry, "relay_store_breaker_state") == 2
    breaker.half_open()
    assert value(registry, "relay_store_breaker_state") == 1
    breaker.close()

    assert value(registry, "relay_store_breaker_state") == 0
    for old, new in (("closed", "open"), ("open", "half-open"), ("half-open", "closed")):
        assert value(registry, "relay_store_breaker_transitions_total", **{"from": old, "to": new}) == 1
    logged = [(r.__dict__["from"], r.__dict__["to"]) for r in events(store_logs, "store_breaker_change")]
    assert logged == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_plans_publish_phase_and_flag_gauges(metrics: StoreMetrics, registry: CollectorRegistry) -> None:
    metrics.set_plans({"machines": PRESETS["shadow"], "audit": PRESETS["redis-read"]})

    assert value(registry, "relay_store_phase", domain="machines", phase="shadow") == 1
    assert value(registry, "relay_store_phase", domain="machines", phase="memory") == 0
    assert value(registry, "relay_store_phase", domain="audit", phase="redis-read") == 1
    assert value(registry, "relay_store_flag", domain="machines", flag="dual_write") == 1
    assert value(registry, "relay_store_flag", domain="machines", flag="backend_redis") == 0
    assert value(registry, "relay_store_flag", domain="audit", flag="read_preference_redis") == 1
    assert value(registry, "relay_store_flag", domain="audit", flag="fallback_to_memory") == 1
    assert value(registry, "relay_store_flag", domain="audit", flag="shadow_sample_rate") == 1.0


def test_flag_change_is_logged_counted_and_published(
    metrics: StoreMetrics, registry: CollectorRegistry, store_logs: pytest.LogCaptureFixture
) -> None:
    old = {d: PRESETS["memory"] for d in DOMAINS}
    new = {**old, "machines": PRESETS["dual-write"]}
    metrics.set_plans(old)

    assert metrics.log_flag_change(old, new) == 1

    assert value(registry, "relay_store_flag_changes_total", domain="machines") == 1
    assert value(registry, "relay_store_flag_changes_total", domain="audit") == 0
    assert value(registry, "relay_store_phase", domain="machines", phase="dual-write") == 1
    assert value(registry, "relay_store_phase", domain="machines", phase="memory") == 0
    (record,) = events(store_logs, "store_flag_change")
    assert record.__dict__["domain"] == "machines"
    assert (record.__dict__["fromPhase"], record.__dict__["toPhase"]) == ("memory", "dual-write")
    assert record.__dict__["changes"]["dualWrite"] == [False, True]


def test_flags_changed_counts_and_publishes_without_logging(
    metrics: StoreMetrics, registry: CollectorRegistry, store_logs: pytest.LogCaptureFixture
) -> None:
    old = {d: PRESETS["memory"] for d in DOMAINS}
    new = {**old, "audit": PRESETS["shadow"], "locale": PRESETS["shadow"]}

    assert metrics.flags_changed(old, new) == ["audit", "locale"]

    assert value(registry, "relay_store_flag_changes_total", domain="audit") == 1
    assert value(registry, "relay_store_flag", domain="locale", flag="shadow_compare") == 1
    assert events(store_logs, "store_flag_change") == []


def test_key_counts_are_published(metrics: StoreMetrics, registry: CollectorRegistry) -> None:
    metrics.set_key_counts({("machines", "redis"): 12, ("idempotency", "memory"): 3})
    metrics.set_key_counts({("machines", "redis"): 11})

    assert value(registry, "relay_store_keys", domain="machines", backend="redis") == 11
    assert value(registry, "relay_store_keys", domain="idempotency", backend="memory") == 3


def test_two_instances_on_their_own_registries_do_not_clash(clock: Clock) -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    reporting = StoreMetrics(first, clock=clock)
    reporting.fallback("machines", "get", "read")
    reporting.fold()
    StoreMetrics(second, clock=clock).fold()

    assert value(first, "relay_store_fallbacks_total", domain="machines", op="get", kind="read") == 1
    assert value(second, "relay_store_fallbacks_total", domain="machines", op="get", kind="read") == 0


def test_exposition_is_parseable_text(metrics: StoreMetrics) -> None:
    metrics.operation("ratelimit", "redis", "incr", "ok", 0.0004)

    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}

    assert families["relay_store_operation_seconds"].type == "histogram"
    assert families["relay_store_breaker_state"].type == "gauge"
    count = [s for s in families["relay_store_operation_seconds"].samples
             if s.name == "relay_store_operation_seconds_count"]
    assert [(s.labels["domain"], s.value) for s in count] == [("ratelimit", 1.0)]


# -- rolling window ---------------------------------------------------------------------------------
def test_percentiles_come_from_the_window_in_milliseconds(metrics: StoreMetrics) -> None:
    for ms in range(1, 101):
        metrics.operation("audit", "redis", "get", "ok", ms / 1000)
    for _ in range(100):
        metrics.operation("audit", "memory", "get", "ok", 0.00002)

    summary = metrics.domain_summary("audit", "redis-read")

    assert summary["phase"] == "redis-read"
    assert summary["operations"] == 200
    redis = summary["backends"]["redis"]
    assert redis["operations"] == 100
    assert redis["p50Ms"] == pytest.approx(50, rel=0.01)
    assert redis["p95Ms"] == pytest.approx(95, rel=0.01)
    assert redis["p99Ms"] == pytest.approx(99, rel=0.01)
    assert summary["backends"]["memory"]["p99Ms"] == pytest.approx(0.02, rel=0.01)
    assert summary["p50Ms"] == pytest.approx(0.02, rel=0.01)
    assert summary["p95Ms"] == pytest.approx(90, rel=0.01)


def test_calls_that_took_no_time_count_at_the_smallest_latency(metrics: StoreMetrics) -> None:
    for _ in range(50):
        metrics.operation("audit", "redis", "get", "rejected", 0.0)
        metrics.operation("locale", "redis", "get", "rejected", 0.0)
    metrics.operation("locale", "redis", "get", "ok", 0.01)

    refused = metrics.domain_summary("audit", "rampdown")["backends"]["redis"]
    assert refused["operations"] == 50 and refused["errorRate"] == 1.0
    assert refused["p50Ms"] == refused["p99Ms"] == pytest.approx(1e-4, rel=0.01)
    mixed = metrics.domain_summary("locale", "rampdown")["backends"]["redis"]
    assert mixed["operations"] == 51
    assert mixed["p50Ms"] == pytest.approx(1e-4, rel=0.01) and mixed["p99Ms"] == pytest.approx(10, rel=0.01)


def test_rates_are_events_per_call_and_mismatches_per_comparison(metrics: StoreMetrics) -> None:
    outcomes = ["ok"] * 180 + ["error"] * 10 + ["rejected"] * 4 + ["timeout"] * 6
    for outcome in outcomes:
        metrics.operation("machines", "redis", "get", outcome, 0.001)
    for _ in range(5):
        metrics.fallback("machines", "get", "read")
    for outcome in ["match"] * 8 + ["different", "extra"] + ["skipped", "error"]:
        metrics.shadow("machines", outcome)

    summary = metrics.domain_summary("machines", "redis-read")

    assert summary["operations"] == 200
    assert summary["errorRate"] == pytest.approx(14 / 200)
    assert summary["timeoutRate"] == pytest.approx(6 / 200)
    assert summary["fallbackRate"] == pytest.approx(5 / 200)
    assert summary["comparisons"] == 10
    assert summary["mismatchRate"] == pytest.approx(2 / 10)


def test_an_idle_domain_has_no_latency_and_no_rates(metrics: StoreMetrics) -> None:
    summary = metrics.domain_summary("locale", "memory")

    assert summary == {"phase": "memory", "windowSeconds": 300, "operations": 0, "p50Ms": None, "p95Ms": None,
                       "p99Ms": None, "errorRate": None, "timeoutRate": None, "fallbackRate": None,
                       "mismatchRate": None, "comparisons": 0, "backends": {}}


def test_the_window_forgets_what_is_older_than_its_length(metrics: StoreMetrics, clock: Clock) -> None:
    metrics.operation("inflight", "redis", "get", "error", 0.050)
    metrics.fold()  # as the background fold does every second: calls count in the second they are folded
    metrics.shadow("inflight", "different")
    clock.now += 200
    metrics.operation("inflight", "redis", "get", "ok", 0.001)
    metrics.fold()
    metrics.shadow("inflight", "match")

    clock.now += 99
    assert metrics.domain_summary("inflight", None)["operations"] == 2

    clock.now += 1
    later = metrics.domain_summary("inflight", None)
    assert later["operations"] == 1
    assert later["errorRate"] == 0
    assert later["mismatchRate"] == 0
    assert later["p99Ms"] == pytest.approx(1, rel=0.01)

    clock.now += 200
    assert metrics.domain_summary("inflight", None)["operations"] == 0


def test_a_reused_ring_slot_starts_empty(metrics: StoreMetrics, clock: Clock) -> None:
    metrics.operation("templates", "memory", "set", "ok", 0.5)
    metrics.fold()
    clock.now += 300
    metrics.operation("templates", "memory", "set", "ok", 0.001)

    summary = metrics.domain_summary("templates", None)

    assert summary["operations"] == 1
    assert summary["p50Ms"] == pytest.approx(1, rel=0.01)


def test_domains_summary_uses_the_phases_of_the_plans(metrics: StoreMetrics) -> None:
    metrics.set_plans({"machines": PRESETS["shadow"], "locale": PRESETS["memory"]})
    metrics.operation("machines", "memory", "get", "ok", 0.0001)

    summary = metrics.domains_summary()

    assert list(summary) == ["machines", "locale"]
    assert (summary["machines"]["phase"], summary["machines"]["operations"]) == ("shadow", 1)
    assert summary["locale"]["phase"] == "memory"


# -- logs -------------------------------------------------------------------------------------------
def _json_line(record: logging.LogRecord) -> dict[str, Any]:
    return json.loads(JsonFormatter().format(record))


def test_fallback_log_has_event_domain_and_request_id(
    metrics: StoreMetrics, store_logs: pytest.LogCaptureFixture
) -> None:
    token = request_id.set("req-1234")
    try:
        metrics.fallback("idempotency", "set_if_absent", "write")
        (record,) = events(store_logs, "store_fallback")
        line = _json_line(record)
    finally:
        request_id.reset(token)

    assert line["event"] == "store_fallback"
    assert line["domain"] == "idempotency"
    assert (line["op"], line["kind"], line["requestId"]) == ("set_if_absent", "write", "req-1234")


def test_secondary_failure_is_logged(metrics: StoreMetrics, store_logs: pytest.LogCaptureFixture) -> None:
    metrics.secondary_failure("audit", "compare_and_set")

    (record,) = events(store_logs, "store_secondary_write_failed")
    assert (record.__dict__["domain"], record.__dict__["op"]) == ("audit", "compare_and_set")


@pytest.mark.parametrize(("key", "detail", "logged_detail"), [
    ("codexbridge:dev:locale:wx-user-42", "locale", "locale"),
    ("sha256:00112233aabbccdd", "status,summary", "status,summary"),
    (None, "value was 'top secret text'", "redacted"),
])
def test_mismatch_log_hashes_the_key_and_never_shows_values(
    metrics: StoreMetrics, store_logs: pytest.LogCaptureFixture, key: Optional[str], detail: str,
    logged_detail: str
) -> None:
    metrics.shadow("locale", "different", key, detail)

    (record,) = events(store_logs, "store_shadow_mismatch")
    line = _json_line(record)
    text = json.dumps(line)
    assert (line["domain"], line["outcome"], line["fields"]) == ("locale", "different", logged_detail)
    assert "wx-user-42" not in text and "top secret" not in text
    if key is None:
        assert line["keyHash"] is None
    else:
        assert line["keyHash"].startswith("sha256:") and len(line["keyHash"]) == len("sha256:") + 16


def test_matches_and_skips_are_not_logged(metrics: StoreMetrics, store_logs: pytest.LogCaptureFixture) -> None:
    for outcome in ("match", "skipped", "error"):
        metrics.shadow("locale", outcome, detail="queue_full")

    assert events(store_logs, "store_shadow_mismatch") == []


def test_repeated_fallbacks_log_once_per_second_with_the_suppressed_count(
    metrics: StoreMetrics, clock: Clock, store_logs: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        metrics.fallback("machines", "get", "read")
    metrics.fallback("machines", "set", "write")
    clock.now += 1
    metrics.fallback("machines", "get", "read")

    logged = [(r.__dict__["op"], r.__dict__.get("suppressed")) for r in events(store_logs, "store_fallback")]
    assert logged == [("get", None), ("set", None), ("get", 4)]


# -- key cardinality --------------------------------------------------------------------------------
class BrokenStore(MemoryStore):
    def index_count(self, key: str) -> int:
        raise StoreUnavailable("redis unavailable: connection refused")


class OpenBreakerStore(MemoryStore):
    breaker_state = "open"

    def index_count(self, key: str) -> int:
        raise AssertionError("a backend behind an open breaker is not asked")


def test_key_cardinality_counts_indexes_and_scans_prefixes_at_most_once_a_minute(clock: Clock) -> None:
    memory = MemoryStore()
    memory.index_add("a:dev:{machines}:#all", {"m1": 1.0, "m2": 2.0})
    memory.set("a:dev:idempotency:x", "1")
    memory.set("a:dev:idempotency:#lock%3Asweep", "t")
    sampler = KeyCardinality({"memory": memory, "down": BrokenStore(), "open": OpenBreakerStore()},
                             indexes={"machines": "a:dev:{machines}:#all"},
                             prefixes={"idempotency": "a:dev:idempotency:"}, clock=clock)

    assert sampler.counts() == {("machines", "memory"): 2, ("idempotency", "memory"): 1}

    memory.set("a:dev:idempotency:y", "1")
    memory.index_add("a:dev:{machines}:#all", {"m3": 3.0})
    clock.now += 59
    assert sampler.counts() == {("machines", "memory"): 3, ("idempotency", "memory"): 1}
    clock.now += 1
    assert sampler.counts()[("idempotency", "memory")] == 2


def test_a_refused_call_counts_as_the_four_events_it_stands_for(
    registry: CollectorRegistry, clock: Clock, store_logs: pytest.LogCaptureFixture
) -> None:
    """``refused`` is one report for a rejected call, a fallback, a memory call and a skipped mirror
    write: the instruments, the rolling window and the log see what those four would have shown."""
    refused = StoreMetrics(registry, clock=clock)
    apart_registry = CollectorRegistry()
    apart = StoreMetrics(apart_registry, clock=clock)

    refused.refused("audit", "redis", "set", "write", 0.002, True)
    refused.refused("audit", "redis", "get", "read", 0.001, False)
    apart.operation("audit", "redis", "set", "rejected", 0.0)
    apart.secondary_skipped("audit", "set")
    apart.fallback("audit", "set", "write")
    apart.operation("audit", "memory", "set", "ok", 0.002)
    apart.operation("audit", "redis", "get", "rejected", 0.0)
    apart.fallback("audit", "get", "read")
    apart.operation("audit", "memory", "get", "ok", 0.001)
    refused.fold()
    apart.fold()

    def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in reg.collect()
                for s in family.samples if s.name.startswith("relay_store_") and not s.name.endswith("_created")}

    assert samples(registry) == samples(apart_registry)
    assert value(registry, "relay_store_errors_total", backend="redis", domain="audit", op="set",
                 outcome="rejected") == 1
    assert value(registry, "relay_store_secondary_writes_skipped_total", domain="audit", op="set") == 1
    assert refused.domain_summary("audit", "rampdown") == apart.domain_summary("audit", "rampdown")
    logged = events(store_logs, "store_fallback")
    assert [(r.op, r.kind) for r in logged] == [("set", "write"), ("get", "read")] * 2
