"""``RoutedStore``: one domain's store under one migration plan.

* Writes go to the authoritative backend first, then (dual write) to the other.
  A failed authoritative write skips the mirror (counted); with Redis
  authoritative and fallback on, it is served by memory instead (counted) and
  journalled for write-back once Redis is healthy. A failed mirror write is
  counted and never fails the caller.
* Reads come from the preferred backend; a Redis failure with fallback on is
  served by memory (counted). Sampled reads are compared with the other backend
  off the request path (``middleware.shadow``).
* Atomic operations (reserve, compare-and-set, increment, locks, trims) are
  decided by the authoritative backend; their effect is mirrored to the other.

Every backend call is timed and reported to the ``StoreObserver``.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, TypeVar

import pybreaker

from config.phases import DomainPlan
from middleware.observer import ERROR, OK, REJECTED, TIMEOUT, StoreObserver
from middleware.shadow import ShadowComparer
from middleware.writeback import WriteBackJournal, copy_newer
from relay.stores.base import Store, StoreError

T = TypeVar("T")


def classify(exc: BaseException) -> str:
    """The observer outcome of a failed backend call."""
    cause = exc.__cause__
    if isinstance(cause, pybreaker.CircuitBreakerError):
        return REJECTED
    if cause is not None and "Timeout" in type(cause).__name__:
        return TIMEOUT
    return ERROR


class RoutedStore(Store):
    def __init__(
        self,
        domain: str,
        plan: DomainPlan,
        backends: Mapping[str, Store],
        observer: StoreObserver,
        shadow: Optional[ShadowComparer] = None,
        journal: Optional[WriteBackJournal] = None,
        sample: Callable[[], float] = random.random,
        pull_from: Optional[Store] = None,
    ) -> None:
        super().__init__(backends[plan.backend].max_value_bytes)
        self.domain = domain
        self.plan = plan
        self.backend_name = plan.backend
        self._backends = backends
        self._auth = backends[plan.backend]
        self._secondary = backends[plan.secondary] if plan.secondary else None
        self._reader = backends[plan.read_preference]
        self._memory = backends.get("memory")
        self._observer = observer
        self._shadow = shadow if plan.shadow_compare else None
        self._journal = journal
        self._sample = sample
        self._pull_from = pull_from

    # -- plumbing ---------------------------------------------------------------------------------
    def _pull(self, *keys: str) -> None:
        """While a backfill or warm-up of this domain runs, bring each key an operation touches
        over from the backend being copied, before the operation decides anything. So a
        reservation made before the switch is still seen (no msgId dispatched twice) and a
        compare-and-set finds the record it read."""
        if self._pull_from is None:
            return
        for key in keys:
            try:
                copy_newer(self._pull_from, self._auth, key)
            except StoreError:
                self._observer.fallback(self.domain, "pull", "read")
    def _call(self, backend: Store, op: str, fn: Callable[[Store], T]) -> T:
        start = time.perf_counter()
        try:
            result = fn(backend)
        except StoreError as exc:
            self._observer.operation(self.domain, backend.backend_name, op, classify(exc), time.perf_counter() - start)
            raise
        self._observer.operation(self.domain, backend.backend_name, op, OK, time.perf_counter() - start)
        return result

    def _can_fall_back(self, backend: Store) -> bool:
        return (self.plan.fallback_to_memory and backend.backend_name == "redis"
                and self._memory is not None and backend is not self._memory)

    def _read(self, op: str, fn: Callable[[Store], T], shadow_key: Optional[str] = None) -> T:
        try:
            result = self._call(self._reader, op, fn)
        except StoreError:
            if not self._can_fall_back(self._reader):
                raise
            self._observer.fallback(self.domain, op, "read")
            return self._call(self._memory, op, fn)  # type: ignore[arg-type]
        if self._shadow is not None and self._sample() < self.plan.shadow_sample_rate:
            if self.plan.shadow_mode == "aa":
                other: Optional[Store] = self._reader
            else:
                other = self._secondary if self._reader is self._auth else self._auth
            if other is not None:
                self._shadow.submit(self.domain, op, shadow_key, result, other, fn, self._reader)
        return result

    def _write(self, op: str, fn: Callable[[Store], T], mirror: Optional[Callable[[Store, T], Any]] = None,
               keys: Iterable[str] = ()) -> T:
        """Run ``fn`` on the authoritative backend, then ``mirror`` (default: ``fn``) on the other."""
        try:
            result = self._call(self._auth, op, fn)
        except StoreError:
            if self._secondary is not None:
                self._observer.secondary_skipped(self.domain, op)
            if not self._can_fall_back(self._auth):
                raise
            self._observer.fallback(self.domain, op, "write")
            result = self._call(self._memory, op, fn)  # type: ignore[arg-type]
            if self._journal is not None:
                self._journal.record(self.domain, keys)
            return result
        if self._secondary is not None:
            try:
                if mirror is None:
                    self._call(self._secondary, op, fn)
                else:
                    self._call(self._secondary, op, lambda s: mirror(s, result))
            except (StoreError, ValueError):
                self._observer.secondary_failure(self.domain, op)
        return result

    # -- plain values -----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[str]:
        self._pull(key)
        return self._read("get", lambda s: s.get(key), key)

    def mget(self, keys: Sequence[str]) -> list[Optional[str]]:
        keys = list(keys)
        self._pull(*keys)
        return self._read("mget", lambda s: s.mget(keys), ",".join(keys[:1]))

    def ttl_ms(self, key: str) -> Optional[int]:
        return self._read("ttl", lambda s: s.ttl_ms(key))

    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        self._write("set", lambda s: s.set(key, value, ttl_ms), keys=[key])

    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        items = dict(items)
        self._write("mset", lambda s: s.mset(items, ttl_ms), keys=list(items))

    def delete(self, *keys: str) -> int:
        return self._write("delete", lambda s: s.delete(*keys), keys=keys)

    # -- atomic helpers: decided by the authoritative backend, mirrored as plain writes ------------
    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        self._pull(key)
        def mirror(s: Store, won: bool) -> None:
            if won:
                s.set(key, value, ttl_ms)

        return self._write("set_if_absent", lambda s: s.set_if_absent(key, value, ttl_ms), mirror, [key])

    def compare_and_set(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int] = None) -> bool:
        self._pull(key)
        def mirror(s: Store, won: bool) -> None:
            if won:
                s.set(key, value, ttl_ms)

        return self._write("compare_and_set", lambda s: s.compare_and_set(key, expected, value, ttl_ms), mirror,
                           [key])

    def compare_and_delete(self, key: str, expected: str) -> bool:
        self._pull(key)
        def mirror(s: Store, won: bool) -> None:
            if won:
                s.delete(key)

        return self._write("compare_and_delete", lambda s: s.compare_and_delete(key, expected), mirror, [key])

    def incr(self, key: str, amount: int = 1, ttl_ms: Optional[int] = None) -> int:
        return self._write("incr", lambda s: s.incr(key, amount, ttl_ms), lambda s, _: s.incr(key, amount, ttl_ms))

    # -- locks: the authoritative backend alone decides who holds a lock ---------------------------
    def acquire_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        return self._call(self._auth, "acquire_lock", lambda s: s.acquire_lock(key, token, ttl_ms))

    def release_lock(self, key: str, token: str) -> bool:
        return self._call(self._auth, "release_lock", lambda s: s.release_lock(key, token))

    def extend_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        return self._call(self._auth, "extend_lock", lambda s: s.extend_lock(key, token, ttl_ms))

    # -- sorted index -----------------------------------------------------------------------------
    def index_add(self, key: str, members: Mapping[str, float]) -> None:
        members = dict(members)
        self._write("index_add", lambda s: s.index_add(key, members), keys=[key])

    def index_range(self, key: str, limit: Optional[int] = None, newest_first: bool = True,
                    min_score: Optional[float] = None, max_score: Optional[float] = None) -> list[tuple[str, float]]:
        self._pull(key)
        return self._read("index_range", lambda s: s.index_range(key, limit, newest_first, min_score, max_score), key)

    def index_remove(self, key: str, members: Iterable[str]) -> int:
        members = list(members)
        return self._write("index_remove", lambda s: s.index_remove(key, members), keys=[key])

    def index_count(self, key: str) -> int:
        return self._read("index_count", lambda s: s.index_count(key))

    def index_trim(self, key: str, max_size: int) -> list[str]:
        def mirror(s: Store, dropped: list[str]) -> None:
            if dropped:
                s.index_remove(key, dropped)

        return self._write("index_trim", lambda s: s.index_trim(key, max_size), mirror, [key])

    # -- lifecycle --------------------------------------------------------------------------------
    def ping(self) -> bool:
        return self._auth.ping()

    def scan_keys(self, prefix: str) -> list[str]:
        return self._read("scan", lambda s: s.scan_keys(prefix))

    def close(self) -> None:
        """Backends are shared by every routed store; the router closes them."""
