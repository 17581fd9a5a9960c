"""Store telemetry: Prometheus metrics, a rolling per-domain summary, and structured logs.

``StoreMetrics`` is the ``StoreObserver`` the routed stores report to. Each report feeds

* Prometheus instruments (``relay_store_*``), exported at ``/metrics/prometheus``;
* an in-process rolling window per domain (the last ``window_s`` seconds, one bucket per
  second) from which ``domain_summary`` gives p50/p95/p99 latency and error, timeout,
  fallback and mismatch rates for the JSON ``/metrics``;
* JSON log lines on the ``relay.store`` logger for fallbacks, breaker changes, shadow
  mismatches, secondary-write failures and flag changes. Logs carry an ``event`` name and
  the domain; never a stored value, and a key only as a hash.

Several gunicorn workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``config/gunicorn.py`` sets it
before any worker imports prometheus_client) every process writes its values to files in that
directory and the exposition merges them, so a scrape served by any worker shows the totals of
all of them. The instruments are then created once per process whatever registry is passed,
because two instruments of one name would overwrite each other's file entries. Without the
variable the instruments live in a registry: the default one, shared by every ``StoreMetrics`` of
the process, unless a ``CollectorRegistry`` is injected (tests). The rolling window is always this
process's own view.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
from bisect import bisect_left
from collections import Counter as CountOf
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import pybreaker
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from config.phases import PHASES, DomainPlan
from middleware.breaker import StateChangeListener
from middleware.observer import DIFFERENT, ERROR, EXTRA, MATCH, MISSING, OK, REJECTED, TIMEOUT, drain
from relay.stores.base import Store, StoreError

__all__ = ["CONTENT_TYPE_LATEST", "KeyCardinality", "LATENCY_BUCKETS", "StoreMetrics", "multiprocess_dir"]

log = logging.getLogger("relay.store")


#: Histogram buckets in seconds, from 10 µs (memory calls) to 1 s (past the Redis deadline).
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: ``StoreMetrics`` folds queued calls into the histogram after this many calls or seconds.
FOLD_BATCH = 512
FOLD_INTERVAL_S = 1.0
#: ``relay_store_breaker_state`` values.
BREAKER_STATES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}
#: Phase label for a mix of flags that matches no preset.
CUSTOM_PHASE = "custom"
#: Shadow outcomes that count as a comparison, and those that are a mismatch.
COMPARED = frozenset({MATCH, MISSING, EXTRA, DIFFERENT})
MISMATCHES = frozenset({MISSING, EXTRA, DIFFERENT})

_HASHED_KEY = re.compile(r"sha256:[0-9a-f]{8,64}")
_SAFE_DETAIL = re.compile(r"[A-Za-z0-9_.,:-]{1,200}")


def multiprocess_dir() -> Optional[str]:
    """The prometheus_client multiprocess directory, when this process runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# -- Prometheus instruments ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Instruments:
    latency: Histogram
    errors: Counter
    timeouts: Counter
    retries: Counter
    fallbacks: Counter
    secondary_failures: Counter
    secondary_skipped: Counter
    shadow: Counter
    breaker_transitions: Counter
    writebacks: Counter
    flag_changes: Counter
    breaker_state: Gauge
    flag: Gauge
    phase: Gauge
    keys: Gauge
    audit_link_behind: Gauge

    @classmethod
    def build(cls, registry: Optional[CollectorRegistry]) -> "_Instruments":
        r = registry
        return cls(
            latency=Histogram("relay_store_operation_seconds", "Store backend call latency.",
                              ["backend", "domain", "op", "outcome"], buckets=LATENCY_BUCKETS, registry=r),
            errors=Counter("relay_store_errors", "Failed store backend calls (error, or rejected by an open breaker).",
                           ["backend", "domain", "op", "outcome"], registry=r),
            timeouts=Counter("relay_store_timeouts", "Store backend calls that timed out.",
                             ["backend", "domain", "op"], registry=r),
            retries=Counter("relay_store_retries", "Retried store backend attempts.", ["backend"], registry=r),
            fallbacks=Counter("relay_store_fallbacks", "Reads or writes served by memory because Redis failed.",
                              ["domain", "op", "kind"], registry=r),
            secondary_failures=Counter("relay_store_secondary_write_failures",
                                       "Mirrored writes to the non-authoritative backend that failed.",
                                       ["domain", "op"], registry=r),
            secondary_skipped=Counter("relay_store_secondary_writes_skipped",
                                      "Mirrored writes not attempted because the authoritative write failed.",
                                      ["domain", "op"], registry=r),
            shadow=Counter("relay_store_shadow_comparisons", "Shadow comparisons by outcome.",
                           ["domain", "outcome"], registry=r),
            breaker_transitions=Counter("relay_store_breaker_transitions", "Redis circuit breaker transitions.",
                                        ["from", "to"], registry=r),
            writebacks=Counter("relay_store_writebacks", "Fallback writes copied back to Redis, by outcome.",
                               ["domain", "outcome"], registry=r),
            flag_changes=Counter("relay_store_flag_changes", "Store flag changes applied at runtime.",
                                 ["domain"], registry=r),
            breaker_state=Gauge("relay_store_breaker_state",
                                "Redis circuit breaker: 0 closed, 1 half-open, 2 open (worst live worker).",
                                registry=r, multiprocess_mode="livemax"),
            flag=Gauge("relay_store_flag", "Store flags in force (booleans as 0/1, the sample rate as is).",
                       ["domain", "flag"], registry=r, multiprocess_mode="livemax"),
            phase=Gauge("relay_store_phase", "1 for the migration phase in force per domain.",
                        ["domain", "phase"], registry=r, multiprocess_mode="livemax"),
            keys=Gauge("relay_store_keys", "Keys (records) per domain and backend, sampled at scrape time.",
                       ["domain", "backend"], registry=r, multiprocess_mode="livemostrecent"),
            audit_link_behind=Gauge("relay_audit_link_behind_seconds",
                                    "How far the audit records' linking watermark is behind the clock, sampled "
                                    "at scrape time (NaN before the first linking pass).",
                                    registry=r, multiprocess_mode="livemostrecent"),
        )


_shared: Optional[_Instruments] = None
_shared_lock = threading.Lock()


def _process_instruments() -> _Instruments:
    """One set of instruments per process: in the default registry, or in the multiprocess files."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = _Instruments.build(None if multiprocess_dir() else REGISTRY)
        return _shared


def _add_observations(child: Any, bucket_counts: Sequence[float], total: float) -> None:
    """Add many observations to one histogram child: ``bucket_counts[i]`` fell in bucket ``i``
    (``+Inf`` last) and their values sum to ``total``.

    prometheus_client has no public call for this. These are the values ``Histogram.observe``
    increments itself (``_sum`` and one of ``_buckets``); ``tests/test_metrics.py`` checks that the
    exposition equals per-call ``observe``, so a change in the library fails there.
    """
    child._sum.inc(total)
    for value, count in zip(child._buckets, bucket_counts):
        if count:
            value.inc(count)


# -- rolling window -------------------------------------------------------------------------------
#: Latencies are kept in logarithmic bins with 1 % relative accuracy (as in DDSketch), so a
#: window's memory depends on the spread of latencies, not on the number of calls.
_ACCURACY = 0.01
_GAMMA = (1 + _ACCURACY) / (1 - _ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
_MIN_SECONDS = 1e-7
#: The bin of every latency up to ``_MIN_SECONDS``.
_ZERO_BIN = math.ceil(math.log(_MIN_SECONDS) / _LOG_GAMMA)


def _all_zero(samples: list[float]) -> bool:
    """Whether every sample is ``0.0``: the calls a breaker refused (``StoreMetrics.refused``),
    whose buckets need no search."""
    return samples[0] == 0.0 and samples.count(0.0) == len(samples)


def _bin_seconds(index: int) -> float:
    return 2 * _GAMMA ** index / (_GAMMA + 1)


def _percentile(bins: Mapping[int, int], total: int, q: float) -> Optional[float]:
    """The nearest-rank ``q`` quantile in milliseconds (within 1 %), ``None`` without data."""
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= rank:
            return round(_bin_seconds(index) * 1000, 4)
    return round(_bin_seconds(max(bins)) * 1000, 4)


def _rate(events: int, total: int) -> Optional[float]:
    return None if total == 0 else round(events / total, 6)


class _Calls:
    """Backend calls of one domain and backend within one second (or merged over a window)."""

    __slots__ = ("count", "errors", "timeouts", "bins")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.timeouts = 0
        self.bins: dict[int, int] = {}

    def add(self, outcome: str, samples: Sequence[float]) -> None:
        """Count calls of one outcome that took ``samples`` seconds (a fold brings hundreds)."""
        self.count += len(samples)
        if outcome == TIMEOUT:
            self.timeouts += len(samples)
        elif outcome in (ERROR, REJECTED):
            self.errors += len(samples)
        bins, log, ceil = self.bins, math.log, math.ceil
        if _all_zero(samples):
            bins[_ZERO_BIN] = bins.get(_ZERO_BIN, 0) + len(samples)
            return
        for seconds in samples:
            index = ceil(log(seconds if seconds > _MIN_SECONDS else _MIN_SECONDS) / _LOG_GAMMA)
            bins[index] = bins.get(index, 0) + 1

    def merge(self, other: "_Calls") -> None:
        self.count += other.count
        self.errors += other.errors
        self.timeouts += other.timeouts
        for index, n in other.bins.items():
            self.bins[index] = self.bins.get(index, 0) + n

    def summary(self) -> dict[str, Any]:
        return {
            "operations": self.count,
            "p50Ms": _percentile(self.bins, self.count, 0.50),
            "p95Ms": _percentile(self.bins, self.count, 0.95),
            "p99Ms": _percentile(self.bins, self.count, 0.99),
            "errorRate": _rate(self.errors, self.count),
            "timeoutRate": _rate(self.timeouts, self.count),
        }


class _Second:
    __slots__ = ("second", "calls", "fallbacks", "comparisons", "mismatches")

    def __init__(self, second: int) -> None:
        self.second = second
        self.calls: dict[str, _Calls] = {}
        self.fallbacks = 0
        self.comparisons = 0
        self.mismatches = 0


class RollingWindow:
    """One domain's last ``window_s`` seconds, as a ring of per-second buckets."""

    def __init__(self, window_s: int, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        self._clock = clock
        self._ring: list[Optional[_Second]] = [None] * window_s
        self._lock = threading.Lock()

    def _bucket(self) -> _Second:
        """The current second's bucket (the caller holds the lock)."""
        second = int(self._clock())
        slot = second % self.window_s
        bucket = self._ring[slot]
        if bucket is None or bucket.second != second:
            bucket = self._ring[slot] = _Second(second)
        return bucket

    def _bucket_at(self, second: int) -> Optional[_Second]:
        """The bucket of ``second``, or ``None`` once the ring has moved past it (lock held)."""
        slot = second % self.window_s
        bucket = self._ring[slot]
        if bucket is None or bucket.second < second:
            bucket = self._ring[slot] = _Second(second)
        elif bucket.second > second:
            return None
        return bucket

    def calls(self, second: int, groups: Sequence[tuple[str, str, Sequence[float]]]) -> None:
        """Count ``(backend, outcome, samples)`` groups of calls in ``second`` under one lock."""
        with self._lock:
            bucket = self._bucket_at(second)
            if bucket is None:
                return
            for backend, outcome, samples in groups:
                per_backend = bucket.calls.get(backend)
                if per_backend is None:
                    per_backend = bucket.calls[backend] = _Calls()
                per_backend.add(outcome, samples)

    def fallbacks(self, second: int, count: int) -> None:
        with self._lock:
            bucket = self._bucket_at(second)
            if bucket is not None:
                bucket.fallbacks += count

    def comparison(self, mismatch: bool) -> None:
        with self._lock:
            bucket = self._bucket()
            bucket.comparisons += 1
            bucket.mismatches += mismatch

    def summary(self) -> dict[str, Any]:
        """Percentiles and rates over the live buckets; rates are ``None`` when nothing was counted."""
        with self._lock:
            oldest = int(self._clock()) - self.window_s
            live = [b for b in self._ring if b is not None and b.second > oldest]
            by_backend: dict[str, _Calls] = {}
            fallbacks = comparisons = mismatches = 0
            for bucket in live:
                for backend, calls in bucket.calls.items():
                    by_backend.setdefault(backend, _Calls()).merge(calls)
                fallbacks += bucket.fallbacks
                comparisons += bucket.comparisons
                mismatches += bucket.mismatches
        total = _Calls()
        for calls in by_backend.values():
            total.merge(calls)
        out = total.summary()
        out["fallbackRate"] = _rate(fallbacks, total.count)
        out["mismatchRate"] = _rate(mismatches, comparisons)
        out["comparisons"] = comparisons
        out["backends"] = {name: calls.summary() for name, calls in sorted(by_backend.items())}
        return out


# -- logs -----------------------------------------------------------------------------------------
class _LogThrottle:
    """At most one log line per key and interval; reports how many were held back in between.

    During an outage every store call asks, so a line held back takes no lock: it is queued on its
    key (``deque.append``) and the queue's length is reported with the next line. Under threads a
    line held back at the very moment the next one is admitted may go uncounted; under gevent none
    is."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        #: Per key: when its last line was admitted, and the lines held back since.
        self._state: dict[tuple[str, ...], tuple[float, deque[None]]] = {}

    def admit(self, key: tuple[str, ...]) -> Optional[int]:
        """The number of suppressed lines to report with this one, or ``None`` to drop it."""
        now = self._clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self._interval_s:
            state[1].append(None)
            return None
        with self._lock:
            state = self._state.get(key)
            if state is not None and now - state[0] < self._interval_s:
                state[1].append(None)
                return None
            self._state[key] = (now, deque())
            return 0 if state is None else len(state[1])


def redact_key(key: Optional[str]) -> Optional[str]:
    """A key as logs may show it: a SHA-256 prefix (already hashed keys pass through)."""
    if key is None or _HASHED_KEY.fullmatch(key):
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _safe_detail(detail: Optional[str]) -> Optional[str]:
    """Shadow details are field names or error class names; anything else is not logged."""
    if detail is None or _SAFE_DETAIL.fullmatch(detail):
        return detail
    return "redacted"


def _plan_flags(plan: DomainPlan) -> dict[str, float]:
    return {
        "backend_redis": float(plan.backend == "redis"),
        "read_preference_redis": float(plan.read_preference == "redis"),
        "dual_write": float(plan.dual_write),
        "fallback_to_memory": float(plan.fallback_to_memory),
        "shadow_compare": float(plan.shadow_compare),
        "shadow_sample_rate": float(plan.shadow_sample_rate),
    }


# -- the observer ---------------------------------------------------------------------------------
#: The labels of a backend call: ``(domain, backend, op, outcome)``.
CallLabels = tuple[str, str, str, str]
#: What a fold hands its listeners: the calls' seconds per label set, and the counter increments
#: ``{(instrument, label values): count}`` (instruments ``fallbacks`` ``(domain, op, kind)``,
#: ``secondary_failures`` and ``secondary_skipped`` ``(domain, op)``, ``writebacks``
#: ``(domain, outcome)``), a refused call already counted as the four it stands for.
FoldListener = Callable[[Mapping[CallLabels, Sequence[float]], Mapping[tuple[str, tuple[str, ...]], int]], None]


class StoreMetrics:
    """The ``StoreObserver`` behind ``/metrics/prometheus``, ``store.domains`` and the store logs.

    ``registry``: where the instruments live when not in multiprocess mode (default: the process's
    shared instruments in the default registry); in multiprocess mode it is ignored and the
    process's one set of file-backed instruments is used. ``window_s``: length of the rolling window of
    ``domain_summary``. ``clock``: monotonic seconds, for the window and the log throttle.
    ``log_interval_s``: at most one fallback, mismatch or secondary-failure line per
    (event, domain, operation) and interval; the next line reports how many were suppressed.
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        *,
        window_s: int = 300,
        clock: Callable[[], float] = time.monotonic,
        log_interval_s: float = 1.0,
    ) -> None:
        if window_s < 1:
            raise ValueError("window_s must be at least 1")
        self.multiprocess = multiprocess_dir() is not None
        if self.multiprocess or registry is None:
            self._i = _process_instruments()
            self.registry = None if self.multiprocess else REGISTRY
        else:
            self._i = _Instruments.build(registry)
            self.registry = registry
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, RollingWindow] = {}
        self._windows_lock = threading.Lock()
        self._throttle = _LogThrottle(log_interval_s, clock)
        self._retry_sources: dict[str, Callable[[], Mapping[str, int]]] = {}
        self._retries_seen: dict[str, int] = {}
        self._retries_lock = threading.Lock()
        self._plans: dict[str, DomainPlan] = {}
        #: Latency histogram and counter children by label values: ``labels()`` validates the values and
        #: looks the child up under a lock on every call.
        self._latency_children: dict[tuple[str, str, str, str], Any] = {}
        self._counter_children: dict[tuple[str, tuple[str, ...]], Any] = {}
        #: Calls reported since the last ``fold``; ``deque.append`` needs no lock.
        self._pending: deque[tuple[CallLabels, float]] = deque()
        #: Counter increments (instrument name, label values) waiting for the next ``fold``.
        self._counts: deque[tuple[str, tuple[str, ...]]] = deque()
        #: Calls memory served because a backend refused them, waiting for the next ``fold``.
        self._refusals: deque[tuple[str, str, str, str, float, bool]] = deque()
        self._fold_listeners: list[FoldListener] = []
        self._fold_lock = threading.Lock()
        self._folder: Optional[threading.Thread] = None
        self._stop_folding = threading.Event()

    # -- StoreObserver ------------------------------------------------------------------------------
    def operation(self, domain: str, backend: str, op: str, outcome: str, seconds: float) -> None:
        """Queue the call for the next ``fold``: the only work done per call."""
        pending = self._pending
        pending.append(((domain, backend, op, outcome), seconds))
        if len(pending) >= FOLD_BATCH:
            self.fold()

    def add_fold_listener(self, listener: FoldListener) -> None:
        """Hand every fold's events to ``listener`` as well (``RoutingStats``, the counts of
        ``/ops/store``): one queue per store call serves both."""
        self._fold_listeners.append(listener)

    def fold(self) -> None:
        """Add the queued calls to the latency histogram, the error and timeout counters and the
        rolling windows, the queued fallbacks, mirror failures and write-backs to their counters,
        and hand them to the fold listeners.

        In multiprocess mode each ``Histogram.observe`` takes prometheus_client's process-wide lock,
        calls ``getpid`` and writes the metrics file twice; at some 25 store calls per callback that
        was a third of the relay's Python time under load. Folded, a batch costs one increment per
        bucket touched per label set. Reads (``domain_summary``, ``exposition``) fold first, calls
        fold every ``FOLD_BATCH`` calls, and ``start`` folds every ``FOLD_INTERVAL_S`` in the
        background; the rolling window counts a batch in the second it is folded.
        """
        with self._fold_lock:
            second = int(self._clock())
            groups: dict[CallLabels, list[float]] = {}
            for labels, seconds in drain(self._pending):
                groups.setdefault(labels, []).append(seconds)
            counts = drain(self._counts)
            for domain, backend, op, kind, seconds, mirror_skipped in drain(self._refusals):
                groups.setdefault((domain, backend, op, REJECTED), []).append(0.0)
                groups.setdefault((domain, "memory", op, OK), []).append(seconds)
                counts.append(("fallbacks", (domain, op, kind)))
                if mirror_skipped:
                    counts.append(("secondary_skipped", (domain, op)))
            self._fold_calls(groups, second)
            increments = CountOf(counts)
            fallbacks: CountOf[str] = CountOf()
            for (instrument, labels), count in increments.items():
                self._counter_child(instrument, labels).inc(count)
                if instrument == "fallbacks":
                    fallbacks[labels[0]] += count
            for domain, count in fallbacks.items():
                self._window(domain).fallbacks(second, count)
            for listener in self._fold_listeners:
                listener(groups, increments)
        self.sync()

    def _fold_calls(self, groups: Mapping[CallLabels, list[float]], second: int) -> None:
        """Per label set, the histogram's bucket counts and sum and the errors or timeouts; per
        domain, the window's calls."""
        windows: dict[str, list[tuple[str, str, list[float]]]] = {}
        for (domain, backend, op, outcome), samples in groups.items():
            buckets = [0] * (len(LATENCY_BUCKETS) + 1)
            if _all_zero(samples):
                buckets[0] = len(samples)
            else:
                for seconds in samples:
                    buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            _add_observations(self._latency_child((backend, domain, op, outcome)), buckets, sum(samples))
            if outcome == TIMEOUT:
                self._i.timeouts.labels(backend, domain, op).inc(len(samples))
            elif outcome in (ERROR, REJECTED):
                self._i.errors.labels(backend, domain, op, outcome).inc(len(samples))
            windows.setdefault(domain, []).append((backend, outcome, samples))
        for domain, window_groups in windows.items():
            self._window(domain).calls(second, window_groups)

    def start(self, interval_s: float = FOLD_INTERVAL_S) -> None:
        """Fold every ``interval_s`` in a daemon thread, until ``stop``."""
        if self._folder is not None:
            return
        self._stop_folding.clear()

        def loop() -> None:
            while not self._stop_folding.wait(interval_s):
                self.fold()

        self._folder = threading.Thread(target=loop, name="store-metrics-fold", daemon=True)
        self._folder.start()

    def stop(self) -> None:
        """Stop the background fold, and fold what is queued."""
        self._stop_folding.set()
        if self._folder is not None:
            self._folder.join(timeout=5)
            self._folder = None
        self.fold()

    def _counter_child(self, instrument: str, labels: tuple[str, ...]) -> Any:
        """The child of counter ``instrument`` for ``labels``."""
        key = (instrument, labels)
        child = self._counter_children.get(key)
        if child is None:
            child = self._counter_children.setdefault(key, getattr(self._i, instrument).labels(*labels))
        return child

    def _latency_child(self, labels: tuple[str, str, str, str]) -> Any:
        child = self._latency_children.get(labels)
        if child is None:
            child = self._latency_children.setdefault(labels, self._i.latency.labels(*labels))
        return child

    def fallback(self, domain: str, op: str, kind: str) -> None:
        """Counted at the next ``fold`` (during an outage every store call falls back); logged now, at
        most once a second per domain and operation, with the request's id."""
        self._counts.append(("fallbacks", (domain, op, kind)))
        suppressed = self._throttle.admit(("store_fallback", domain, op))
        if suppressed is not None:
            _log_fallback(domain, op, kind, suppressed)

    def refused(self, domain: str, backend: str, op: str, kind: str, seconds: float, mirror_skipped: bool) -> None:
        """Queued once; the next ``fold`` counts the rejected call, the memory call, the fallback and
        the skipped mirror write. The fallback is logged as ``fallback`` logs it."""
        refusals = self._refusals
        refusals.append((domain, backend, op, kind, seconds, mirror_skipped))
        suppressed = self._throttle.admit(("store_fallback", domain, op))
        if suppressed is not None:
            _log_fallback(domain, op, kind, suppressed)
        if len(refusals) >= FOLD_BATCH:
            self.fold()

    def secondary_failure(self, domain: str, op: str) -> None:
        self._counts.append(("secondary_failures", (domain, op)))
        self._log_throttled(logging.WARNING, "mirrored store write failed", "store_secondary_write_failed",
                            domain, op)

    def secondary_skipped(self, domain: str, op: str) -> None:
        self._counts.append(("secondary_skipped", (domain, op)))

    def shadow(self, domain: str, outcome: str, key: Optional[str] = None, detail: Optional[str] = None) -> None:
        self._i.shadow.labels(domain, outcome).inc()
        if outcome in COMPARED:
            self._window(domain).comparison(outcome in MISMATCHES)
        if outcome in MISMATCHES:
            self._log_throttled(logging.WARNING, "shadow comparison mismatch", "store_shadow_mismatch", domain,
                                outcome, outcome=outcome, keyHash=redact_key(key), fields=_safe_detail(detail))

    def writeback(self, domain: str, outcome: str) -> None:
        """Counted at the next ``fold``."""
        self._counts.append(("writebacks", (domain, outcome)))

    # -- breaker, retries, flags ----------------------------------------------------------------------
    def watch_breaker(self, breaker: pybreaker.CircuitBreaker) -> None:
        """Count and log the breaker's transitions, and keep ``relay_store_breaker_state`` current."""
        self._i.breaker_state.set(BREAKER_STATES.get(breaker.current_state, 0))
        breaker.add_listener(StateChangeListener(self._breaker_changed))

    def _breaker_changed(self, name: Optional[str], old: Optional[str], new: str) -> None:
        self._i.breaker_transitions.labels(old or "none", new).inc()
        self._i.breaker_state.set(BREAKER_STATES.get(new, 0))
        level = logging.INFO if new == pybreaker.STATE_CLOSED else logging.WARNING
        log.log(level, "store circuit breaker changed state",
                extra={"event": "store_breaker_change", "breaker": name, "from": old, "to": new})

    def watch_retries(self, backend: str, snapshot: Callable[[], Mapping[str, int]]) -> None:
        """Feed ``relay_store_retries_total{backend}`` from a backend's ``counters.snapshot``.

        The counter follows the snapshot's ``retries`` at every ``fold`` and every scrape.
        """
        with self._retries_lock:
            self._retry_sources[backend] = snapshot
            self._retries_seen.setdefault(backend, 0)
        self._sync_retries(backend)

    def _sync_retries(self, backend: str) -> None:
        with self._retries_lock:
            total = int(self._retry_sources[backend]().get("retries", 0))
            delta = total - self._retries_seen[backend]
            if delta <= 0:
                return
            self._retries_seen[backend] = total
        self._i.retries.labels(backend).inc(delta)

    def set_plans(self, plans: Mapping[str, DomainPlan]) -> None:
        """Publish the plans in force: ``relay_store_phase`` and ``relay_store_flag`` per domain."""
        for domain, plan in plans.items():
            current = plan.phase or CUSTOM_PHASE
            for phase in (*PHASES, CUSTOM_PHASE):
                self._i.phase.labels(domain, phase).set(1.0 if phase == current else 0.0)
            for flag, value in _plan_flags(plan).items():
                self._i.flag.labels(domain, flag).set(value)
            self._plans[domain] = plan

    def flags_changed(self, old: Mapping[str, DomainPlan], new: Mapping[str, DomainPlan]) -> list[str]:
        """Count each domain whose plan changed and publish ``new``; return the changed domains.

        For a caller that logs the change itself; ``log_flag_change`` also logs it.
        """
        changed = [domain for domain, plan in new.items() if old.get(domain) != plan]
        for domain in changed:
            self._i.flag_changes.labels(domain).inc()
        self.set_plans(new)
        return changed

    def log_flag_change(self, old: Mapping[str, DomainPlan], new: Mapping[str, DomainPlan]) -> int:
        """``flags_changed``, plus one ``store_flag_change`` log line per changed domain naming the
        flags that moved; return how many domains changed."""
        changed = self.flags_changed(old, new)
        for domain in changed:
            before = old.get(domain)
            was = before.as_flags() if before is not None else {}
            now = new[domain].as_flags()
            diff = {name: [was.get(name), value] for name, value in now.items() if was.get(name) != value}
            log.info("store flags changed", extra={
                "event": "store_flag_change", "domain": domain,
                "fromPhase": was.get("phase"), "toPhase": now["phase"], "changes": diff,
            })
        return len(changed)

    def set_key_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Publish ``relay_store_keys`` for ``{(domain, backend): count}``."""
        for (domain, backend), count in counts.items():
            self._i.keys.labels(domain, backend).set(count)

    def set_audit_link_behind(self, seconds: Optional[float]) -> None:
        """Publish ``relay_audit_link_behind_seconds`` (``None``: no watermark yet, NaN)."""
        self._i.audit_link_behind.set(math.nan if seconds is None else seconds)

    # -- reading ------------------------------------------------------------------------------------
    def domain_summary(self, domain: str, phase: Optional[str]) -> dict[str, Any]:
        """``store.domains.<domain>`` of the JSON ``/metrics``, over this process's rolling window.

        Latencies are in milliseconds. ``errorRate`` (errors and breaker rejections),
        ``timeoutRate`` and ``fallbackRate`` are per backend call, ``mismatchRate`` per shadow
        comparison; each is ``None`` while its denominator is 0. ``backends`` splits calls,
        latencies and error/timeout rates by backend.
        """
        self.fold()
        return {"phase": phase, "windowSeconds": self.window_s, **self._window(domain).summary()}

    def domains_summary(self, phases: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, dict[str, Any]]:
        """``domain_summary`` for every domain in ``phases`` (default: the plans of ``set_plans``)."""
        if phases is None:
            phases = {domain: plan.phase or CUSTOM_PHASE for domain, plan in self._plans.items()}
        return {domain: self.domain_summary(domain, phase) for domain, phase in phases.items()}

    def sync(self) -> None:
        """Bring values that are read rather than reported (retries) up to date (``fold`` does too)."""
        for backend in list(self._retry_sources):
            self._sync_retries(backend)

    def exposition(self) -> bytes:
        """The text exposition: of every worker's files in multiprocess mode, else of the registry."""
        self.fold()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    # -- internals ----------------------------------------------------------------------------------
    def _window(self, domain: str) -> RollingWindow:
        window = self._windows.get(domain)
        if window is None:
            with self._windows_lock:
                window = self._windows.setdefault(domain, RollingWindow(self.window_s, self._clock))
        return window

    def _log_throttled(self, level: int, message: str, event: str, domain: str, op: str, **fields: Any) -> None:
        suppressed = self._throttle.admit((event, domain, op))
        if suppressed is not None:
            _log(level, message, event, domain, op, suppressed, fields)


def _log_fallback(domain: str, op: str, kind: str, suppressed: int) -> None:
    """The fallback line ``_log_throttled`` would write: during an outage every store call asks for
    it, so callers ask the throttle themselves and a line held back costs the ``admit`` only."""
    _log(logging.WARNING, "store fallback to memory", "store_fallback", domain, op, suppressed, {"kind": kind})


def _log(level: int, message: str, event: str, domain: str, op: str, suppressed: int,
         fields: Mapping[str, Any]) -> None:
    extra = {"event": event, "domain": domain, "op": op, **fields}
    if suppressed:
        extra["suppressed"] = suppressed
    log.log(level, message, extra=extra)


# -- key cardinality ------------------------------------------------------------------------------
class KeyCardinality:
    """Key counts per (domain, backend), cheap enough to take at every scrape.

    ``indexes`` maps a domain to the full key of the index that lists all its records: its size
    (``index_count``) is read at every call. ``prefixes`` maps the other domains to their key
    prefix: those are counted with the backend's ``scan_keys(prefix)`` when it has one (the memory
    backend), at most once per ``scan_interval_s``, and the cached count is reused in between. A
    backend whose circuit breaker is not closed is not asked (a scrape never takes the half-open
    trial call); a backend that fails is skipped for that scrape.
    """

    def __init__(
        self,
        backends: Mapping[str, Store],
        indexes: Mapping[str, str],
        prefixes: Mapping[str, str],
        scan_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = dict(backends)
        self._indexes = dict(indexes)
        self._prefixes = dict(prefixes)
        self._scan_interval_s = scan_interval_s
        self._clock = clock
        self._scanned: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for name, backend in self._backends.items():
            if getattr(backend, "breaker_state", pybreaker.STATE_CLOSED) != pybreaker.STATE_CLOSED:
                continue
            try:
                for domain, index_key in self._indexes.items():
                    out[(domain, name)] = backend.index_count(index_key)
                out.update(self._scan(name, backend, self._prefixes.items()))
            except StoreError:
                continue
        return out

    def _scan(self, name: str, backend: Store, prefixes: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        scan = getattr(backend, "scan_keys", None)
        if scan is None:
            return {}
        out = {}
        now = self._clock()
        for domain, prefix in prefixes:
            with self._lock:
                cached = self._scanned.get((domain, name))
            if cached is None or now - cached[0] >= self._scan_interval_s:
                records = sum(1 for key in scan(prefix) if not key.startswith("#", len(prefix)))
                cached = (now, records)
                with self._lock:
                    self._scanned[(domain, name)] = cached
            out[(domain, name)] = cached[1]
        return out
