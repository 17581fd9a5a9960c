"""``MemoryStore``: the in-process backend, with Redis semantics (TTL included).

Values are stored as the serialized strings callers pass in, so a caller can
never share a reference with the store. Expiry is checked on every access and
expired keys are reclaimed from a heap of deadlines, a few at a time, so no
call scans the whole key space.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional, Union

from sortedcontainers import SortedList

from relay.locks import compute_lock
from relay.stores.base import (
    DEFAULT_MAX_VALUE_BYTES,
    LATE,
    TARGET,
    THROUGH,
    Store,
    StoreError,
    lowered,
    validate_limit,
    validate_lock_ttl,
    validate_ttl,
    validate_value,
    vouched,
)

Clock = Callable[[], float]


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0


class _Top:
    """Sorts after every string, to bound a score range inclusively."""

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return True


_TOP = _Top()


class _Index:
    """A sorted set: member -> score plus an ordered list of (score, member)."""

    __slots__ = ("scores", "ordered")

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self.ordered: SortedList = SortedList()

    def add(self, member: str, score: float) -> None:
        old = self.scores.get(member)
        if old is not None:
            self.ordered.remove((old, member))
        self.scores[member] = score
        self.ordered.add((score, member))

    def remove(self, member: str) -> bool:
        old = self.scores.pop(member, None)
        if old is None:
            return False
        self.ordered.remove((old, member))
        return True


Value = Union[str, int, _Index]


class MemoryStore(Store):
    backend_name = "memory"

    #: How many expired keys one call reclaims at most, so no call is slow.
    RECLAIM_PER_CALL = 64

    def __init__(
        self,
        clock: Clock = monotonic_ms,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_keys: Optional[int] = None,
    ) -> None:
        super().__init__(max_value_bytes)
        self._clock = clock
        #: Every operation is computation only, so under gevent the lock is the OS thread's.
        self._lock = compute_lock()
        self._data: dict[str, Value] = {}
        self._expires: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []
        self.max_keys = max_keys

    # -- internals ----------------------------------------------------------------------
    def _reclaim(self, now: float) -> None:
        heap = self._deadlines
        for _ in range(self.RECLAIM_PER_CALL):
            if not heap or heap[0][0] > now:
                return
            deadline, key = heapq.heappop(heap)
            if self._expires.get(key) == deadline:
                del self._expires[key]
                self._data.pop(key, None)

    def _live(self, key: str, now: float) -> Optional[Value]:
        deadline = self._expires.get(key)
        if deadline is not None and deadline <= now:
            del self._expires[key]
            self._data.pop(key, None)
            return None
        return self._data.get(key)

    def _put(self, key: str, value: Value, ttl_ms: Optional[int], now: float) -> None:
        if key not in self._data and self.max_keys is not None and len(self._data) >= self.max_keys:
            raise StoreError(f"memory store is full ({self.max_keys} keys)")
        self._data[key] = value
        self._set_expiry(key, ttl_ms, now)

    def _set_expiry(self, key: str, ttl_ms: Optional[int], now: float) -> None:
        if ttl_ms is None:
            self._expires.pop(key, None)
            return
        deadline = now + ttl_ms
        self._expires[key] = deadline
        heapq.heappush(self._deadlines, (deadline, key))
        if len(self._deadlines) > 2 * len(self._expires) + self.RECLAIM_PER_CALL:
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Drop heap entries of keys whose TTL was replaced or removed.

        Rewriting a key with a TTL leaves its old deadline in the heap; without
        this, a key rewritten often with a long TTL would grow the heap for as
        long as the TTL. Rebuilding only when stale entries outnumber live ones
        keeps the cost amortized O(1) per write.
        """
        self._deadlines = [(deadline, key) for key, deadline in self._expires.items()]
        heapq.heapify(self._deadlines)

    def _begin(self) -> float:
        now = self._clock()
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] <= now:
            self._reclaim(now)
        return now

    def _string(self, key: str, now: float) -> Optional[str]:
        value = self._live(key, now)
        if value is None or isinstance(value, str):
            return value
        raise StoreError(f"WRONGTYPE key {key!r} does not hold a value")

    def _index(self, key: str, now: float, create: bool = False) -> Optional[_Index]:
        value = self._live(key, now)
        if value is None:
            if not create:
                return None
            value = _Index()
            self._put(key, value, None, now)
        if not isinstance(value, _Index):
            raise StoreError(f"WRONGTYPE key {key!r} does not hold an index")
        return value

    # -- plain values ---------------------------------------------------------------------
    def get(self, key: str) -> Optional[str]:
        with self._lock:
            return self._string(key, self._begin())

    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        with self._lock:
            self._put(key, value, ttl_ms, self._begin())

    def delete(self, *keys: str) -> int:
        with self._lock:
            now = self._begin()
            removed = 0
            for key in keys:
                if self._live(key, now) is not None:
                    del self._data[key]
                    self._expires.pop(key, None)
                    removed += 1
            return removed

    def mget(self, keys: Sequence[str]) -> list[Optional[str]]:
        with self._lock:
            now = self._begin()
            return [self._string(k, now) for k in keys]

    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        ttl_ms = validate_ttl(ttl_ms)
        checked = {k: validate_value(v, self.max_value_bytes) for k, v in items.items()}
        with self._lock:
            now = self._begin()
            for key, value in checked.items():
                self._put(key, value, ttl_ms, now)

    # -- atomic helpers -------------------------------------------------------------------
    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        with self._lock:
            now = self._begin()
            if self._live(key, now) is not None:
                return False
            self._put(key, value, ttl_ms, now)
            return True

    def compare_and_set(
        self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int] = None
    ) -> bool:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        with self._lock:
            now = self._begin()
            if self._string(key, now) != expected:
                return False
            self._put(key, value, ttl_ms, now)
            return True

    def compare_and_delete(self, key: str, expected: str) -> bool:
        with self._lock:
            now = self._begin()
            if self._string(key, now) != expected:
                return False
            del self._data[key]
            self._expires.pop(key, None)
            return True

    def incr(self, key: str, amount: int = 1, ttl_ms: Optional[int] = None) -> int:
        ttl_ms = validate_ttl(ttl_ms)
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ValueError(f"amount must be an integer, got {amount!r}")
        with self._lock:
            now = self._begin()
            current = self._live(key, now)
            if current is None:
                self._put(key, amount, ttl_ms, now)
                return amount
            if not isinstance(current, int):
                raise StoreError(f"WRONGTYPE key {key!r} does not hold a counter")
            self._data[key] = current + amount
            return current + amount

    def ttl_ms(self, key: str) -> Optional[int]:
        with self._lock:
            now = self._begin()
            if self._live(key, now) is None:
                return None
            deadline = self._expires.get(key)
            return None if deadline is None else max(1, int(deadline - now))

    # -- locks ------------------------------------------------------------------------------
    def acquire_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        return self.set_if_absent(key, token, validate_lock_ttl(ttl_ms))

    def release_lock(self, key: str, token: str) -> bool:
        with self._lock:
            now = self._begin()
            if self._live(key, now) != token:
                return False
            del self._data[key]
            self._expires.pop(key, None)
            return True

    def extend_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        ttl_ms = validate_lock_ttl(ttl_ms)
        with self._lock:
            now = self._begin()
            if self._live(key, now) != token:
                return False
            self._set_expiry(key, ttl_ms, now)
            return True

    # -- sorted index ---------------------------------------------------------------------
    def index_add(self, key: str, members: Mapping[str, float]) -> None:
        scores = {str(m): float(s) for m, s in members.items()}
        if not scores:
            return
        with self._lock:
            index = self._index(key, self._begin(), create=True)
            for member, score in scores.items():
                index.add(member, score)

    def index_range(
        self,
        key: str,
        limit: Optional[int] = None,
        newest_first: bool = True,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
    ) -> list[tuple[str, float]]:
        limit = validate_limit(limit)
        with self._lock:
            index = self._index(key, self._begin())
            if index is None or limit == 0:
                return []
            lo = None if min_score is None else (min_score, "")
            hi = None if max_score is None else (max_score, _TOP)
            out: list[tuple[str, float]] = []
            for score, member in index.ordered.irange(lo, hi, reverse=newest_first):
                out.append((member, score))
                if limit is not None and len(out) >= limit:
                    break
            return out

    def index_remove(self, key: str, members: Iterable[str]) -> int:
        with self._lock:
            index = self._index(key, self._begin())
            if index is None:
                return 0
            removed = sum(1 for m in members if index.remove(str(m)))
            if not index.scores:
                self._data.pop(key, None)
            return removed

    def index_count(self, key: str) -> int:
        with self._lock:
            index = self._index(key, self._begin())
            return 0 if index is None else len(index.scores)

    def index_trim(self, key: str, max_size: int) -> list[str]:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ValueError(f"max_size must be a non-negative integer, got {max_size!r}")
        with self._lock:
            index = self._index(key, self._begin())
            if index is None:
                return []
            overflow = len(index.scores) - max_size
            if overflow <= 0:
                return []
            victims = [member for _, member in index.ordered[:overflow]]
            for member in victims:
                index.remove(member)
            if not index.scores:
                self._data.pop(key, None)
            return victims

    # -- watermarks: each call under the lock, so no pass or writer comes between its steps ----
    def watermark_lower(self, key: str, score: float) -> None:
        with self._lock:
            index = self._index(key, self._begin())
            if index is None:
                return
            late = lowered(index.scores, float(score))
            if late is not None:
                index.add(LATE, late)

    def watermark_begin(self, key: str, upto: float) -> Optional[float]:
        with self._lock:
            index = self._index(key, self._begin(), create=True)
            assert index is not None
            start = vouched(index.scores)
            if start is not None:
                index.add(THROUGH, start)
            if TARGET not in index.scores:
                index.remove(LATE)
            index.add(TARGET, float(upto))
            return start

    def watermark_end(self, key: str, upto: float) -> Optional[float]:
        with self._lock:
            index = self._index(key, self._begin())
            if index is None:
                return None
            if index.scores.get(TARGET) != upto:
                return vouched(index.scores)
            through = vouched({**index.scores, THROUGH: float(upto)})
            assert through is not None
            index.add(THROUGH, through)
            index.remove(TARGET)
            index.remove(LATE)
            return through

    # -- introspection used by backfill and tests ---------------------------------------------
    def scan_keys(self, prefix: str) -> list[str]:
        """Live keys starting with ``prefix`` (a full scan; for backfill and operators only)."""
        with self._lock:
            now = self._begin()
            return sorted(k for k in list(self._data) if k.startswith(prefix) and self._live(k, now) is not None)

    def key_count(self) -> int:
        with self._lock:
            return len(self._data)
