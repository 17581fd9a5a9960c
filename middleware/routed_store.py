"""``RoutedStore``: one domain's store under one migration plan.

* Writes go to the authoritative backend first, then (dual write) to the other.
  A failed authoritative write skips the mirror (counted); with Redis
  authoritative and fallback on, it is served by memory instead (counted) and
  journalled for write-back once Redis is healthy. A failed mirror write is
  counted, journalled for repair from the authoritative backend, and never fails
  the caller. A reservation (``set_if_absent``) on Redis that fails without a
  fallback is journalled to be undone, since Redis may have applied it; a delete
  that fails there is journalled to be done once Redis answers.
* Read repair: an operation on Redis first settles the journalled work of the
  keys it touches (and, while a backfill runs, pulls them over from memory); if
  that fails, the operation fails like Redis failing (fallback or error), so
  between Redis coming back and the next reconciler pass nothing is decided on
  Redis without the writes it missed (no msgId dispatched twice).
* Reads come from the preferred backend; a Redis failure with fallback on is
  served by memory (counted). Sampled reads are compared with the other backend
  off the request path (``middleware.shadow``).
* Atomic operations (reserve, compare-and-set, increment, locks, trims) are
  decided by the authoritative backend; their effect is mirrored to the other.
* A ``#local:`` key (``relay.stores.keys.backend_local``: the audit linking
  watermark) describes its backend alone: it is written and read on the
  authoritative backend only, never mirrored, shadow-read or copied.

With memory the only backend configured (no Redis), a call goes straight to it.
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
from middleware.unit_of_work import RECORDER, current
from middleware.writeback import (
    REPAIR_MEMORY,
    REPAIR_REDIS,
    WriteBackJournal,
    copy_newer,
    forget,
    settle_all,
    undo,
)
from relay.stores.base import Claim, CounterGuard, Op, Store, StoreError, StoreUnavailable
from relay.stores.keys import backend_local

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
        #: Redis calls may share round trips within a unit of work (``middleware.unit_of_work``): Redis
        #: decides and serves everything, nothing is mirrored, copied or shadow-read.
        self.batching = (plan.backend == "redis" and plan.read_preference == "redis" and plan.secondary is None
                         and pull_from is None and self._shadow is None)
        #: The only backend configured serves everything: nothing to fall back to, mirror, settle, pull
        #: or compare, so a call goes straight to it (still timed and reported).
        self._alone = (len(backends) == 1 and self._secondary is None and self._reader is self._auth
                       and self._shadow is None and pull_from is None)
        #: Whether memory serves what the reader or the authoritative backend fails. While such a
        #: backend's breaker refuses calls (``refuses_calls``, asked once per unit of work while it
        #: does), a call falls back without being built (no journal settling, no Redis attempt, no
        #: exception), so an outage costs little more than memory mode; the half-open trial still
        #: goes through, in the next unit of work.
        self._reader_falls_back = self._can_fall_back(self._reader)
        self._auth_falls_back = self._can_fall_back(self._auth)
        #: Redis's data losses when this store was built. A store built before the last one belongs
        #: to a unit of work that began before it was noticed (``StoreRouter.redis_data_lost`` builds
        #: new stores that pull from memory first): such a store treats Redis as unavailable rather
        #: than decide anything on the emptied server.
        self._redis = backends.get("redis")
        self._redis_losses = self._redis.data_losses if self._redis is not None else 0

    # -- plumbing ---------------------------------------------------------------------------------
    def _pull(self, *keys: str) -> None:
        """While a backfill or warm-up of this domain runs, bring each key an operation touches
        over from the backend being copied, before the operation decides anything. So a
        reservation made before the switch is still seen (no msgId dispatched twice) and a
        compare-and-set finds the record it read. Into Redis this happens in ``_prepared``,
        as part of the Redis call."""
        if self._pull_from is None or self._auth.backend_name == "redis":
            return
        for key in keys:
            try:
                copy_newer(self._pull_from, self._auth, key)
            except StoreError:
                self._observer.fallback(self.domain, "pull", "read")

    def _prepared(self, backend: Store, keys: Sequence[str], fn: Callable[[Store], T]) -> Callable[[Store], T]:
        """``fn``, preceded by settling the keys' journalled work aimed at ``backend`` and, on Redis
        while a backfill runs, by pulling them over from memory. A failure there is the call's failure.

        Settling first, and waiting for a settle already running elsewhere (the reconciler), keeps a
        repair from resurrecting a key this call deletes, and a decision on Redis from missing a write
        made during a fallback. It happens also while the breaker reads "open": once its reset
        timeout has passed the next call is let through as the half-open trial, and while it refuses,
        settling is refused at once too (no network) and the call fails over as it would have."""
        if not keys:
            return fn
        repair = self._journal is not None and self._journal.has(self.domain)
        pull = backend.backend_name == "redis" and self._pull_from is not None and self._pull_from is not backend
        if not (repair or pull):
            return fn

        def prepared(store: Store) -> T:
            if repair:
                self._settle(keys, backend.backend_name)
            if pull:
                for key in keys:
                    copy_newer(self._pull_from, store, key)  # type: ignore[arg-type]
            return fn(store)

        return prepared

    def _settle(self, keys: Sequence[str], target: str) -> None:
        """Carry out the journalled tasks of ``keys`` aimed at backend ``target`` now; raise
        ``StoreUnavailable`` (the tasks left kept) when one fails."""
        journal = self._journal
        assert journal is not None
        for key in keys:
            try:
                tasks = journal.claim(self.domain, key, target=target)
            except TimeoutError as exc:
                raise StoreUnavailable(str(exc)) from exc
            if not tasks:
                continue
            done, left = settle_all(self._backends, key, tasks)
            journal.release(self.domain, key, left)
            for outcome in done:
                self._observer.writeback(self.domain, outcome)
            if left:
                raise StoreUnavailable("journalled work on this key could not be carried out")

    def _call(self, backend: Store, op: str, fn: Callable[[Store], T]) -> T:
        if backend is self._redis and backend.data_losses != self._redis_losses:
            raise StoreUnavailable("redis lost its data after this unit of work began")
        unit = current() if self.batching and backend is self._auth else None
        if unit is not None:
            return unit.run(self, backend, op, fn(RECORDER))  # type: ignore[arg-type]
        start = time.perf_counter()
        try:
            result = fn(backend)
        except StoreError as exc:
            self._observer.operation(self.domain, backend.backend_name, op, classify(exc), time.perf_counter() - start)
            raise
        self._observer.operation(self.domain, backend.backend_name, op, OK, time.perf_counter() - start)
        return result

    # -- what the unit of work asks -----------------------------------------------------------------
    @property
    def batch_backend(self) -> Store:
        return self._auth

    @property
    def fallback_to_memory(self) -> bool:
        return self._auth_falls_back

    def report(self, op: str, error: Optional[StoreError], seconds: float) -> None:
        """One call of a round trip the unit of work made for this store."""
        outcome = OK if error is None else classify(error)
        self._observer.operation(self.domain, self._auth.backend_name, op, outcome, seconds)

    def fall_back(self, op: str, call: Op) -> bool:
        """A deferred write whose round trip failed: write it to memory and journal it, when this
        domain may fall back; ``False`` when it may not."""
        if not self.fallback_to_memory:
            return False
        self._observer.fallback(self.domain, op, "write")
        self._call(self._memory, op, call.run)  # type: ignore[arg-type]
        self._journal_fallback(call.keys())
        return True

    def prefetch(self, keys: Sequence[str]) -> None:
        unit = current() if self.batching else None
        if unit is not None:
            for key in keys:
                unit.prefetch(self, key)

    def defer(self, op: Op) -> None:
        unit = current() if self.batching else None
        if unit is None:
            super().defer(op)
        else:
            unit.defer(self, op.name, op)

    def flush(self) -> None:
        unit = current() if self.batching else None
        if unit is not None:
            unit.flush()

    def follow(self, op: Op) -> bool:
        unit = current() if self.batching else None
        if unit is None:
            return False
        unit.follow(self, op.name, op)
        return True

    def _can_fall_back(self, backend: Store) -> bool:
        return (self.plan.fallback_to_memory and backend.backend_name == "redis"
                and self._memory is not None and backend is not self._memory)

    @staticmethod
    def _refuses(backend: Store) -> bool:
        """Whether ``backend`` refuses calls now: asked once per unit of work while it does."""
        unit = current()
        return backend.refuses_calls() if unit is None else unit.refuses(backend)

    def _serve_refused(self, backend: Store, op: str, kind: str, fn: Callable[[Store], T]) -> T:
        """Memory serves ``op``, which ``backend`` refused; the observer hears of it once
        (``StoreObserver.refused``), or event by event when memory fails too."""
        mirror_skipped = kind == "write" and self._secondary is not None
        start = time.perf_counter()
        try:
            result = fn(self._memory)  # type: ignore[arg-type]
        except Exception as exc:
            observer = self._observer
            observer.operation(self.domain, backend.backend_name, op, REJECTED, 0.0)
            if mirror_skipped:
                observer.secondary_skipped(self.domain, op)
            observer.fallback(self.domain, op, kind)
            if isinstance(exc, StoreError):
                observer.operation(self.domain, "memory", op, classify(exc), time.perf_counter() - start)
            raise
        self._observer.refused(self.domain, backend.backend_name, op, kind, time.perf_counter() - start,
                               mirror_skipped)
        return result

    def _read(self, op: str, fn: Callable[[Store], T], shadow_key: Optional[str] = None,
              keys: Sequence[str] = ()) -> T:
        if self._alone:
            return self._call(self._auth, op, fn)
        if backend_local(shadow_key):
            return self._read_local(op, fn)
        if self._reader_falls_back and self._refuses(self._reader):
            return self._serve_refused(self._reader, op, "read", fn)
        try:
            result = self._call(self._reader, op, self._prepared(self._reader, keys, fn))
        except StoreError:
            if not self._reader_falls_back:
                raise
            return self._read_fallback(op, fn)
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
        if self._alone:
            return self._call(self._auth, op, fn)
        keys = list(keys)
        if self._auth_falls_back and self._refuses(self._auth):
            result = self._serve_refused(self._auth, op, "write", fn)
            self._journal_fallback(keys)
            return result
        try:
            result = self._call(self._auth, op, self._prepared(self._auth, keys, fn))
        except StoreError:
            if not self._auth_falls_back:
                if self._secondary is not None:
                    self._observer.secondary_skipped(self.domain, op)
                raise
            return self._write_fallback(op, fn, keys)
        if self._secondary is not None and not any(backend_local(key) for key in keys):
            try:
                mirrored = fn if mirror is None else (lambda s: mirror(s, result))
                self._call(self._secondary, op, self._prepared(self._secondary, keys, mirrored))
            except (StoreError, ValueError):
                self._observer.secondary_failure(self.domain, op)
                if self._journal is not None:
                    repair = REPAIR_REDIS if self._secondary.backend_name == "redis" else REPAIR_MEMORY
                    self._journal.record(self.domain, keys, repair)
        return result

    def _read_local(self, op: str, fn: Callable[[Store], T]) -> T:
        """A ``#local:`` key is written to the authoritative backend alone (``_write``): it is read
        there too, whichever backend serves the other reads, and falls back as writes do."""
        if self._auth_falls_back and self._refuses(self._auth):
            return self._serve_refused(self._auth, op, "read", fn)
        try:
            return self._call(self._auth, op, fn)
        except StoreError:
            if not self._auth_falls_back:
                raise
            return self._read_fallback(op, fn)

    def _read_fallback(self, op: str, fn: Callable[[Store], T]) -> T:
        """The reader failed ``op`` and this domain may fall back: read memory."""
        self._observer.fallback(self.domain, op, "read")
        return self._call(self._memory, op, fn)  # type: ignore[arg-type]

    def _write_fallback(self, op: str, fn: Callable[[Store], T], keys: list[str]) -> T:
        """The authoritative backend failed ``op`` and this domain may fall back: skip the mirror,
        write memory, and journal the keys for the write-back."""
        if self._secondary is not None:
            self._observer.secondary_skipped(self.domain, op)
        self._observer.fallback(self.domain, op, "write")
        result = self._call(self._memory, op, fn)  # type: ignore[arg-type]
        self._journal_fallback(keys)
        return result

    def _journal_fallback(self, keys: Iterable[str]) -> None:
        """Journal the keys of a write memory served instead of Redis, for the write-back."""
        if self._journal is not None:
            self._journal.record(self.domain, keys)

    # -- plain values -----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[str]:
        self._pull(key)
        return self._read("get", lambda s: s.get(key), key, [key])

    def mget(self, keys: Sequence[str]) -> list[Optional[str]]:
        keys = list(keys)
        self._pull(*keys)
        return self._read("mget", lambda s: s.mget(keys), ",".join(keys[:1]), keys)

    def ttl_ms(self, key: str) -> Optional[int]:
        return self._read("ttl", lambda s: s.ttl_ms(key))

    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        self._write("set", lambda s: s.set(key, value, ttl_ms), keys=[key])

    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        items = dict(items)
        self._write("mset", lambda s: s.mset(items, ttl_ms), keys=list(items))

    def delete(self, *keys: str) -> int:
        try:
            return self._write("delete", lambda s: s.delete(*keys), keys=keys)
        except StoreUnavailable:
            # The caller wanted these keys gone (a released reservation, an untracked command): delete
            # them once Redis answers, unless they were written again after this.
            if self._journal is not None and self._auth.backend_name == "redis":
                self._journal.record(self.domain, keys, forget(int(time.time() * 1000)))
            raise

    # -- atomic helpers: decided by the authoritative backend, mirrored as plain writes ------------
    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        self._pull(key)
        def mirror(s: Store, won: bool) -> None:
            if won:
                s.set(key, value, ttl_ms)

        try:
            return self._write("set_if_absent", lambda s: s.set_if_absent(key, value, ttl_ms), mirror, [key])
        except StoreUnavailable:
            # Redis may have applied the reservation before its answer was lost: undo it once Redis
            # answers (only while it holds this very value), so the sender's retry is processed.
            if self._journal is not None and self._auth.backend_name == "redis":
                self._journal.record(self.domain, [key], undo(value))
            raise

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

    def index_add_each(self, adds: Mapping[str, Mapping[str, float]]) -> None:
        adds = {key: dict(members) for key, members in adds.items()}
        self._write("index_add_each", lambda s: s.index_add_each(adds), keys=list(adds))

    def index_range(self, key: str, limit: Optional[int] = None, newest_first: bool = True,
                    min_score: Optional[float] = None, max_score: Optional[float] = None) -> list[tuple[str, float]]:
        self._pull(key)
        return self._read("index_range", lambda s: s.index_range(key, limit, newest_first, min_score, max_score), key,
                          [key])

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

    # -- compound operations ------------------------------------------------------------------------
    def index_add_capped(self, key: str, members: Mapping[str, float], max_size: int,
                         record_prefix: str, watermark: Optional[str] = None) -> list[str]:
        members = dict(members)
        return self._write("index_add_capped",
                           lambda s: s.index_add_capped(key, members, max_size, record_prefix, watermark),
                           keys=[key])

    # -- watermarks: ``#local:`` keys, each call whole on the authoritative backend -----------------
    def watermark_lower(self, key: str, score: float) -> None:
        self._write("watermark_lower", lambda s: s.watermark_lower(key, score), keys=[key])

    def watermark_begin(self, key: str, upto: float) -> Optional[float]:
        return self._write("watermark_begin", lambda s: s.watermark_begin(key, upto), keys=[key])

    def watermark_end(self, key: str, upto: float) -> Optional[float]:
        return self._write("watermark_end", lambda s: s.watermark_end(key, upto), keys=[key])

    def guarded_reserve(self, guard: CounterGuard, key: str, value: str, ttl_ms: Optional[int] = None,
                        counter: Optional[Store] = None) -> tuple[int, bool]:
        """One call to the authoritative backend when the counter's domain is served like this one
        (same backend, both batching, same fallback), else the hit and the reservation one after the
        other, each by its own domain's rules."""
        other = counter if isinstance(counter, RoutedStore) and counter is not self else None
        together = other is None or (other.batching and self.batching and other._auth is self._auth
                                     and other.fallback_to_memory == self.fallback_to_memory)
        if not together or not getattr(self._auth, "cross_slot_scripts", True):
            return super().guarded_reserve(guard, key, value, ttl_ms, counter)
        # Reported as what each domain did: the counter's "incr" and this domain's "set_if_absent".
        started = time.perf_counter()
        try:
            result = self._write("set_if_absent", lambda s: s.guarded_reserve(guard, key, value, ttl_ms), keys=[key])
        except StoreError as exc:
            if other is not None:
                other.report("incr", exc, time.perf_counter() - started)
            if isinstance(exc, StoreUnavailable) and self._journal is not None and self._auth.backend_name == "redis":
                self._journal.record(self.domain, [key], undo(value))
            raise
        if other is not None:
            other.report("incr", None, time.perf_counter() - started)
        return result

    def compare_and_set_then_claim(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int],
                                   claim: Claim, other: Optional[Store] = None) -> tuple[bool, bool]:
        """One call to the authoritative backend when the claimed record's domain is served like this
        one (as ``guarded_reserve``), else the write and then the claim, each by its own domain's rules."""
        owner = other if isinstance(other, RoutedStore) and other is not self else None
        together = owner is None or (owner.batching and self.batching and owner._auth is self._auth
                                     and owner.fallback_to_memory == self.fallback_to_memory)
        if not together or not getattr(self._auth, "cross_slot_scripts", True):
            return super().compare_and_set_then_claim(key, expected, value, ttl_ms, claim, other)
        served_by: list[Store] = []

        def run(s: Store) -> tuple[bool, bool]:
            served_by.append(s)
            return s.compare_and_set_then_claim(key, expected, value, ttl_ms, claim)

        def mirror(s: Store, outcome: tuple[bool, bool]) -> None:
            written, claimed = outcome
            if written:
                s.set(key, value, ttl_ms)
                s.index_remove(claim.index_key, [claim.member])
                if claimed:
                    s.delete(claim.key)

        # Reported as what each domain did: this domain's "compare_and_set" and the claim's
        # "compare_and_delete"; a write memory served is journalled by each domain for its own keys.
        started = time.perf_counter()
        try:
            result = self._write("compare_and_set", run, mirror,
                                 keys=[key] if owner is not None else [key, claim.key, claim.index_key])
        except StoreError as exc:
            if owner is not None:
                owner.report("compare_and_delete", exc, time.perf_counter() - started)
            raise
        if owner is not None:
            owner.report("compare_and_delete", None, time.perf_counter() - started)
            if self._memory is not None and self._memory in served_by:
                owner._journal_fallback([claim.key, claim.index_key])
        return result

    # -- lifecycle --------------------------------------------------------------------------------
    def ping(self) -> bool:
        return self._auth.ping()

    def scan_keys(self, prefix: str) -> list[str]:
        return self._read("scan", lambda s: s.scan_keys(prefix))

    def close(self) -> None:
        """Backends are shared by every routed store; the router closes them."""
