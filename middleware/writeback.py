"""Copying state between backends without ever overwriting a newer value.

* ``WriteBackJournal``: keys written to memory while Redis was authoritative but
  failing (fallback writes). Once Redis answers again they are copied back, so
  reads after recovery see them.
* ``Reconciler.copy_domain``: the backfill (memory to Redis, when a domain moves
  toward Redis authority) and the warm-up (Redis to memory, when it moves back),
  with progress for ``/ops/store``.

The rule for one key (``copy_newer``): a value is written to the target only when
the target has none or an older one (by the envelope's ``updatedAt``), using
compare-and-set so a concurrent newer write always wins. Index members are
merged (union). Counters (rate-limit windows) and locks are not copied: they are
short-lived and only meaningful on the backend that decided them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from middleware.observer import StoreObserver
from relay.stores.base import Store, StoreError
from relay.stores.envelope import raw_updated_at_ms

log = logging.getLogger("relay.store")

WRITTEN, KEPT_NEWER, SKIPPED, FAILED = "written", "kept_newer", "skipped", "error"
#: Domains made of counters only: their windows are short-lived and stay where they were decided.
NOT_COPIED = frozenset({"ratelimit"})


def _is_index(key: str) -> bool:
    return ":#" in key


def _is_lock(key: str) -> bool:
    return ":#lock%3A" in key


def copy_newer(source: Store, target: Store, key: str, counters: bool = False) -> str:
    """Copy one key from ``source`` to ``target`` unless the target holds a newer value."""
    if _is_lock(key):
        return SKIPPED
    if _is_index(key):
        members = dict(source.index_range(key))
        if members:
            target.index_add(key, members)
        return WRITTEN if members else SKIPPED
    value = source.get(key)
    if value is None:
        return SKIPPED
    if raw_updated_at_ms(value) is None and not counters:
        return SKIPPED
    ttl = source.ttl_ms(key)
    for _ in range(8):
        current = target.get(key)
        if current is not None:
            mine, theirs = raw_updated_at_ms(value), raw_updated_at_ms(current)
            if mine is None or theirs is None or theirs >= mine:
                return KEPT_NEWER
        if target.compare_and_set(key, current, value, ttl):
            return WRITTEN
    return KEPT_NEWER


class WriteBackJournal:
    """Keys per domain awaiting write-back to Redis; bounded, with overflow counted."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, set[str]] = {}
        self.max_keys = max_keys
        self.overflow: dict[str, int] = {}

    def record(self, domain: str, keys: Iterable[str]) -> None:
        with self._lock:
            pending = self._pending.setdefault(domain, set())
            for key in keys:
                if len(pending) >= self.max_keys:
                    self.overflow[domain] = self.overflow.get(domain, 0) + 1
                    continue
                pending.add(key)

    def take(self) -> dict[str, set[str]]:
        with self._lock:
            taken, self._pending = self._pending, {}
            return taken

    def restore(self, domain: str, keys: Iterable[str]) -> None:
        self.record(domain, keys)

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {d: len(k) for d, k in self._pending.items() if k}


@dataclass
class CopyProgress:
    """What ``/ops/store`` shows of a backfill or warm-up."""

    direction: str
    state: str = "running"
    total: int = 0
    written: int = 0
    kept_newer: int = 0
    skipped: int = 0
    errors: int = 0
    started_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        done = self.written + self.kept_newer + self.skipped + self.errors
        return {"direction": self.direction, "state": self.state, "total": self.total, "done": done,
                "written": self.written, "keptNewer": self.kept_newer, "skipped": self.skipped,
                "errors": self.errors, "startedAt": round(self.started_at, 3),
                "finishedAt": None if self.finished_at is None else round(self.finished_at, 3)}


class Reconciler:
    """Runs write-backs, backfills and warm-ups in one background thread."""

    def __init__(self, backends: Mapping[str, Store], journal: WriteBackJournal, observer: StoreObserver,
                 prefix_of: Callable[[str], str], interval_s: float = 1.0,
                 on_copy_done: Optional[Callable[[str], None]] = None) -> None:
        self._backends = backends
        self.journal = journal
        self._observer = observer
        self._prefix_of = prefix_of
        self._on_copy_done = on_copy_done
        self._interval_s = interval_s
        self._jobs: list[tuple[str, str]] = []
        self._jobs_lock = threading.Lock()
        self.progress: dict[str, CopyProgress] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- scheduling -------------------------------------------------------------------------------
    def schedule_copy(self, domain: str, direction: str) -> None:
        """``direction`` is ``"backfill"`` (memory to Redis) or ``"warmup"`` (Redis to memory)."""
        with self._jobs_lock:
            self._jobs.append((domain, direction))
            self.progress[domain] = CopyProgress(direction, state="queued")
        self._wake.set()

    def start(self) -> None:
        if self._thread is None and "redis" in self._backends:
            self._thread = threading.Thread(target=self._loop, name="store-reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            try:
                self.run_once()
            except Exception as exc:
                log.error("reconciler pass failed", extra={"event": "reconcile_failed", "error": type(exc).__name__})

    def redis_healthy(self) -> bool:
        redis = self._backends.get("redis")
        if redis is None:
            return False
        breaker = getattr(redis, "breaker", None)
        if breaker is not None and breaker.current_state == "open":
            return False
        try:
            return bool(redis.ping())
        except StoreError:
            return False

    def run_once(self) -> None:
        """One pass: pending write-backs, then queued copies (only while Redis answers)."""
        if not (self.journal.pending() or self._jobs) or not self.redis_healthy():
            return
        self.write_back()
        while True:
            with self._jobs_lock:
                if not self._jobs:
                    return
                domain, direction = self._jobs.pop(0)
            self.copy_domain(domain, direction)

    # -- work -------------------------------------------------------------------------------------
    def write_back(self) -> dict[str, int]:
        memory, redis = self._backends["memory"], self._backends["redis"]
        outcomes: dict[str, int] = {}
        for domain, keys in self.journal.take().items():
            failed = []
            for key in sorted(keys):
                try:
                    outcome = copy_newer(memory, redis, key)
                except StoreError:
                    outcome = FAILED
                    failed.append(key)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                self._observer.writeback(domain, outcome)
            if failed:
                self.journal.restore(domain, failed)
        return outcomes

    def copy_domain(self, domain: str, direction: str) -> CopyProgress:
        if domain in NOT_COPIED:
            progress = CopyProgress(direction, state="done", finished_at=time.time())
            self.progress[domain] = progress
            self._finished(domain)
            return progress
        source, target = ((self._backends["memory"], self._backends["redis"]) if direction == "backfill"
                          else (self._backends["redis"], self._backends["memory"]))
        progress = CopyProgress(direction)
        self.progress[domain] = progress
        try:
            keys = source.scan_keys(self._prefix_of(domain))  # type: ignore[attr-defined]
            progress.total = len(keys)
            for key in keys:
                try:
                    outcome = copy_newer(source, target, key)
                except StoreError:
                    outcome = FAILED
                if outcome == WRITTEN:
                    progress.written += 1
                elif outcome == KEPT_NEWER:
                    progress.kept_newer += 1
                elif outcome == SKIPPED:
                    progress.skipped += 1
                else:
                    progress.errors += 1
            progress.state = "done" if progress.errors == 0 else "failed"
        except StoreError as exc:
            progress.state = "failed"
            with self._jobs_lock:  # the backend went away mid-copy: try again on a later pass
                self._jobs.append((domain, direction))
            log.error("store copy failed", extra={"event": f"{direction}_failed", "domain": domain,
                                                  "error": type(exc).__name__})
        progress.finished_at = time.time()
        log.info("store copy finished", extra={"event": f"{direction}_finished", "domain": domain,
                                               **progress.as_dict()})
        if progress.state == "done":
            self._finished(domain)
        return progress

    def _finished(self, domain: str) -> None:
        if self._on_copy_done is not None:
            self._on_copy_done(domain)
