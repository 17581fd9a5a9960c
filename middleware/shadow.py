"""Shadow compare: sampled reads are repeated on the other backend, off the request path.

A bounded queue feeds one worker thread; when the queue is full a comparison is
dropped and counted as ``skipped``. Values are compared on the envelope's
``data`` (``updatedAt`` ignored). Mismatches keep a bounded, redacted sample:
the key is hashed and only the names of differing fields are kept, never values.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from middleware.observer import DIFFERENT, EXTRA, MATCH, MISSING, SHADOW_ERROR, SKIPPED, StoreObserver
from relay.stores.base import Store
from relay.stores.envelope import comparable

log = logging.getLogger("relay.store")


@dataclass(frozen=True)
class _Job:
    domain: str
    op: str
    key: Optional[str]
    primary: Any
    other: Store
    read: Callable[[Store], Any]
    #: The backend the request read from, re-read when the first comparison disagrees.
    reader: Optional[Store] = None


def redact_key(key: Optional[str]) -> Optional[str]:
    return None if key is None else "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _differing_fields(a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:20]
    return []


def compare(primary: Any, other: Any) -> tuple[str, list[str]]:
    """``(outcome, differing top-level field names)`` for two read results."""
    if isinstance(primary, list) and isinstance(other, list) and primary and isinstance(primary[0], (str, type(None))):
        outcomes = [compare(p, o) for p, o in zip(primary, other)]
        bad = [o for o in outcomes if o[0] != MATCH]
        if len(primary) != len(other):
            return DIFFERENT, []
        return bad[0] if bad else (MATCH, [])
    if isinstance(primary, str) or isinstance(other, str) or primary is None or other is None:
        if primary is None and other is None:
            return MATCH, []
        if other is None:
            return MISSING, []
        if primary is None:
            return EXTRA, []
        a, b = comparable(primary), comparable(other)
        return (MATCH, []) if a == b else (DIFFERENT, _differing_fields(a, b))
    return (MATCH, []) if primary == other else (DIFFERENT, [])


class ShadowComparer:
    def __init__(self, observer: StoreObserver, queue_size: int = 1000, sample_size: int = 100,
                 clock: Callable[[], float] = time.time, rechecks: int = 2, recheck_delay_s: float = 0.02) -> None:
        self.rechecks = rechecks
        self.recheck_delay_s = recheck_delay_s
        self._observer = observer
        self._queue: queue.Queue[Optional[_Job]] = queue.Queue(maxsize=queue_size)
        self._mismatches: deque[dict[str, Any]] = deque(maxlen=sample_size)
        self._clock = clock
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="shadow-compare", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def submit(self, domain: str, op: str, key: Optional[str], primary: Any, other: Store,
               read: Callable[[Store], Any], reader: Optional[Store] = None) -> None:
        try:
            self._queue.put_nowait(_Job(domain, op, key, primary, other, read, reader))
        except queue.Full:
            self._count(domain, SKIPPED)
            self._observer.shadow(domain, SKIPPED, detail="queue_full")

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until queued comparisons are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def mismatches(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._mismatches)

    def _count(self, domain: str, outcome: str) -> None:
        with self._lock:
            per_domain = self.counts.setdefault(domain, {})
            per_domain[outcome] = per_domain.get(outcome, 0) + 1

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self.run(job)
            finally:
                self._queue.task_done()

    def run(self, job: _Job) -> str:
        try:
            outcome, fields_ = compare(job.primary, job.read(job.other))
            for _ in range(self.rechecks if job.reader is not None else 0):
                if outcome == MATCH:
                    break
                # The request may have written the value after reading it (read, then
                # compare-and-set), and the mirror lands just after the authoritative write:
                # compare fresh reads of both before calling it a mismatch.
                time.sleep(self.recheck_delay_s)
                primary = job.read(job.reader)
                outcome, fields_ = compare(primary, job.read(job.other))
        except Exception as exc:
            self._count(job.domain, SHADOW_ERROR)
            self._observer.shadow(job.domain, SHADOW_ERROR, detail=type(exc).__name__)
            return SHADOW_ERROR
        self._count(job.domain, outcome)
        redacted = redact_key(job.key)
        self._observer.shadow(job.domain, outcome, redacted, ",".join(fields_) or None)
        if outcome != MATCH:
            with self._lock:
                self._mismatches.append({"domain": job.domain, "op": job.op, "key": redacted, "outcome": outcome,
                                         "fields": fields_, "at": round(self._clock(), 3)})
        return outcome

