"""Copying state between backends without ever overwriting a newer value.

* ``WriteBackJournal``: keys with pending work once Redis answers again, each with
  its ``Task``: written to memory while Redis was authoritative but failing
  (fallback writes, copied back so reads after recovery see them); a mirror write
  that failed (memory authoritative and the Redis copy failed, or the inverse),
  repaired from the authoritative backend, deletions included; a reservation
  whose answer was lost with no fallback (undone, only if it holds exactly the
  value that request tried to write, so the sender's retry is processed); and a
  delete that failed with no fallback (done later, unless the value was written
  after the delete was asked for), so a released reservation does not linger. The
  ``Reconciler`` works the journal off once a second while Redis answers, and a
  routed store settles a key first when an operation touches it (read repair).
* ``Reconciler.copy_domain``: the backfill (memory to Redis, when a domain moves
  toward Redis authority) and the warm-up (Redis to memory, when it moves back),
  with progress for ``/ops/store``.

The rule for one key (``copy_newer``): a value is written to the target only when
the target has none or an older one (by the envelope's ``updatedAt``), using
compare-and-set so a concurrent newer write always wins. Index members are
merged (union). Counters (rate-limit windows) and locks are not copied: they are
short-lived and only meaningful on the backend that decided them. Nor are keys
named ``#local:...`` (the audit records' linking watermark): each vouches for
what its own backend holds, and a copy would vouch for records the target never
had linked. Members copied into an index with a watermark lower it, as any
write below it does (``Store.watermark_lower``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from middleware.observer import StoreObserver
from relay.locks import compute_lock
from relay.stores.base import Store, StoreError
from relay.stores.envelope import raw_updated_at_ms
from relay.stores.keys import backend_local, watermark_key

log = logging.getLogger("relay.store")

WRITTEN, KEPT_NEWER, SKIPPED, FAILED = "written", "kept_newer", "skipped", "error"
#: ``Task.mode``: newer wins and nothing is deleted / the target is made equal to the source / undo a
#: reservation / delete what is not newer than the failed delete.
NEWER, MIRROR, UNDO, FORGET = "newer", "mirror", "undo", "forget"
#: Domains made of counters only: their windows are short-lived and stay where they were decided.
NOT_COPIED = frozenset({"ratelimit"})


def _is_index(key: str) -> bool:
    return ":#" in key


def copy_order(key: str) -> tuple[bool, str]:
    """Records before indexes: an index entry copied over lowers the index's watermark, and whoever
    then works through the index from there must find the record as copied."""
    return _is_index(key), key


def _stays(key: str) -> bool:
    """A lock, or a ``#local:`` key: meaningful only on the backend that holds it."""
    return ":#lock%3A" in key or backend_local(key)


@dataclass(frozen=True)
class Task:
    """What to do with one journalled key once Redis answers."""

    source: str
    target: str
    mode: str
    #: For ``UNDO``: the exact value the failed reservation tried to write.
    value: Optional[str] = None
    #: For ``FORGET``: when the failed delete was asked for (epoch ms).
    at_ms: Optional[int] = None


#: A fallback write: memory's value is copied to Redis unless Redis holds a newer one.
WRITE_BACK = Task("memory", "redis", NEWER)
#: A failed mirror write, repaired from the authoritative backend.
REPAIR_REDIS = Task("memory", "redis", MIRROR)
REPAIR_MEMORY = Task("redis", "memory", MIRROR)


def undo(value: str) -> Task:
    """Delete a reservation from Redis only while it holds exactly ``value``."""
    return Task("", "redis", UNDO, value)


def forget(at_ms: int) -> Task:
    """Delete a key from Redis unless its value was written after ``at_ms``."""
    return Task("", "redis", FORGET, at_ms=at_ms)


def _lower_watermark(target: Store, key: str, added: Mapping[str, float]) -> None:
    """Members just copied into ``target``'s index ``key`` may lie below the watermark kept over that
    index there (``relay.stores.keys.watermark_key``), which then no longer vouches for them."""
    if added:
        target.watermark_lower(watermark_key(key), min(added.values()))


def copy_newer(source: Store, target: Store, key: str, counters: bool = False) -> str:
    """Copy one key from ``source`` to ``target`` unless the target holds a newer value."""
    if _stays(key):
        return SKIPPED
    if _is_index(key):
        members = dict(source.index_range(key))
        if members:
            target.index_add(key, members)
            # Every member, also one the target had at the same score: its record, copied before it,
            # may have changed without its score changing.
            _lower_watermark(target, key, members)
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


def sync_key(source: Store, target: Store, key: str) -> str:
    """Make ``target`` hold what ``source`` (the authoritative backend) holds for one key.

    A value is copied unless the target's is newer; a value the source no longer has is deleted
    from the target with compare-and-delete (so a concurrent write wins); an index gets the
    source's members and loses the others. Counters, locks and ``#local:`` keys are left alone.
    """
    if _stays(key):
        return SKIPPED
    # The target is read before the source: a write landing on both meanwhile is then either in
    # the source's answer or changes the target under the compare-and-delete, never removed.
    if _is_index(key):
        present = dict(target.index_range(key))
        wanted = dict(source.index_range(key))
        extra = [m for m in present if m not in wanted]
        if extra:
            target.index_remove(key, extra)
        missing = {m: s for m, s in wanted.items() if present.get(m) != s}
        if missing:
            target.index_add(key, missing)
            _lower_watermark(target, key, missing)
        return WRITTEN if extra or missing else SKIPPED
    current = target.get(key)
    if source.get(key) is not None:
        return copy_newer(source, target, key)
    if current is None or raw_updated_at_ms(current) is None:
        return SKIPPED
    return WRITTEN if target.compare_and_delete(key, current) else KEPT_NEWER


def settle(backends: Mapping[str, Store], key: str, task: Task) -> str:
    """Carry out one journalled ``task``; raises ``StoreError`` when a backend fails."""
    target = backends[task.target]
    if task.mode == UNDO:
        assert task.value is not None
        return WRITTEN if target.compare_and_delete(key, task.value) else SKIPPED
    if task.mode == FORGET:
        assert task.at_ms is not None
        current = target.get(key)
        if current is None:
            return SKIPPED
        written_at = raw_updated_at_ms(current)
        if written_at is None or written_at > task.at_ms:
            return KEPT_NEWER
        return WRITTEN if target.compare_and_delete(key, current) else KEPT_NEWER
    source = backends[task.source]
    if task.mode == MIRROR:
        return sync_key(source, target, key)
    return copy_newer(source, target, key)


def settle_all(backends: Mapping[str, Store], key: str, tasks: Sequence[Task]) -> tuple[list[str], list[Task]]:
    """Carry out ``tasks`` in order; return their outcomes and, when a backend failed, the tasks left."""
    outcomes: list[str] = []
    for index, task in enumerate(tasks):
        try:
            outcomes.append(settle(backends, key, task))
        except StoreError:
            return outcomes, list(tasks[index:])
    return outcomes, []


def _merged(tasks: list[Task], task: Task) -> list[Task]:
    """``tasks`` with ``task`` recorded after them. A copy or repair describes the state to reach, so it
    replaces an earlier one; undos and deletes each stand for one failed call and accumulate."""
    if task.mode in (NEWER, MIRROR):
        tasks = [t for t in tasks if t.mode not in (NEWER, MIRROR)]
    elif task in tasks:
        return tasks
    return tasks + [task]


class WriteBackJournal:
    """Keys per domain with pending ``Task``s, carried out in the order they were recorded; bounded
    (per domain, in keys), with overflow counted.

    A key's tasks are carried out by whoever ``claim``s them first (the reconciler, or an operation
    touching the key); until that one ``release``s the key, another claim of it waits, so no
    operation decides on Redis while a write it depends on is still on its way there.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        #: Held only to read and change the dicts (waiting is on a key's ``Event``, outside it), so the
        #: OS thread's lock also under gevent: during an outage every write is recorded.
        self._lock = compute_lock()
        self._pending: dict[str, dict[str, list[Task]]] = {}
        self._busy: dict[tuple[str, str], threading.Event] = {}
        self._busy_domains: dict[str, int] = {}
        self.max_keys = max_keys
        self.overflow: dict[str, int] = {}

    def record(self, domain: str, keys: Iterable[str], task: Task = WRITE_BACK) -> None:
        with self._lock:
            pending = self._pending.setdefault(domain, {})
            for key in keys:
                tasks = pending.get(key)
                if tasks is None:
                    if len(pending) >= self.max_keys:
                        self.overflow[domain] = self.overflow.get(domain, 0) + 1
                    else:
                        pending[key] = [task]
                elif len(tasks) != 1 or tasks[0] is not task:
                    pending[key] = _merged(tasks, task)

    def has(self, domain: str) -> bool:
        """Anything pending or being carried out for ``domain`` (cheap: asked on every operation)."""
        return bool(self._pending.get(domain)) or bool(self._busy_domains.get(domain))

    def keys(self) -> dict[str, list[str]]:
        """The keys pending now, per domain, in ``copy_order``."""
        with self._lock:
            return {d: sorted(k, key=copy_order) for d, k in self._pending.items() if k}

    def claim(self, domain: str, key: str, target: Optional[str] = None, wait_s: float = 2.0) -> list[Task]:
        """Take the tasks of one key (those aimed at backend ``target``, if given) to carry them out,
        then ``release`` the key; an empty list when there are none. A key being carried out
        elsewhere is waited for first; ``TimeoutError`` when that takes longer than ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                busy = self._busy.get((domain, key))
                if busy is None:
                    pending = self._pending.get(domain, {})
                    tasks = pending.get(key, [])
                    taken = [t for t in tasks if target is None or t.target == target]
                    if not taken:
                        return []
                    kept = [t for t in tasks if t not in taken]
                    if kept:
                        pending[key] = kept
                    else:
                        del pending[key]
                    self._busy[(domain, key)] = threading.Event()
                    self._busy_domains[domain] = self._busy_domains.get(domain, 0) + 1
                    return taken
            if not busy.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"journalled work on a {domain} key is still being carried out")

    def release(self, domain: str, key: str, unfinished: Sequence[Task] = ()) -> None:
        """End a ``claim``; ``unfinished`` tasks go back before any recorded meanwhile."""
        with self._lock:
            busy = self._busy.pop((domain, key), None)
            self._busy_domains[domain] -= 1
            if unfinished:
                pending = self._pending.setdefault(domain, {})
                tasks = list(unfinished)
                for task in pending.get(key, []):
                    tasks = _merged(tasks, task)
                pending[key] = tasks
        if busy is not None:
            busy.set()

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
        """``direction`` is ``"backfill"`` (memory to Redis) or ``"warmup"`` (Redis to memory). It
        replaces a copy of the domain still queued: the newest plan decides which way to copy."""
        with self._jobs_lock:
            self._jobs = [job for job in self._jobs if job[0] != domain]
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
        """One pass: pending write-backs, then the copies queued when it began (only while Redis
        answers). A copy a backend failure cut short is queued again for the next pass."""
        if not (self.journal.pending() or self._jobs) or not self.redis_healthy():
            return
        self.write_back()
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
        for domain, direction in jobs:
            with self._jobs_lock:
                replaced = self._queued(domain)
            if not replaced:  # a phase change during the pass queued a newer copy of the domain
                self.copy_domain(domain, direction)

    def _queued(self, domain: str) -> bool:
        """Whether a copy of ``domain`` waits for the next pass (the caller holds the jobs lock)."""
        return any(queued == domain for queued, _ in self._jobs)

    # -- work -------------------------------------------------------------------------------------
    def write_back(self) -> dict[str, int]:
        """Carry out the journalled tasks (write-backs, mirror repairs, undos and deletes); the pass
        stops at the first backend failure, and what is left waits for the next one."""
        outcomes: dict[str, int] = {}
        for target in ("redis", "memory"):
            self._write_back_into(target, outcomes)
        return outcomes

    def _write_back_into(self, target: str, outcomes: dict[str, int]) -> bool:
        """The journalled tasks aimed at ``target``; ``False`` when it failed (the pass for it stops)."""
        for domain, keys in self.journal.keys().items():
            for key in keys:
                try:
                    tasks = self.journal.claim(domain, key, target=target)
                except TimeoutError:
                    continue
                if not tasks:
                    continue
                done, left = settle_all(self._backends, key, tasks)
                self.journal.release(domain, key, left)
                for outcome in done + ([FAILED] if left else []):
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    self._observer.writeback(domain, outcome)
                if left:
                    return False
        return True

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
            keys = sorted(source.scan_keys(self._prefix_of(domain)), key=copy_order)  # type: ignore[attr-defined]
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
            log.error("store copy failed", extra={"event": f"{direction}_failed", "domain": domain,
                                                  "error": type(exc).__name__})
        progress.finished_at = time.time()
        log.info("store copy finished", extra={"event": f"{direction}_finished", "domain": domain,
                                               **progress.as_dict()})
        if progress.state == "done":
            self._finished(domain)
        else:
            # A backend failed for the whole copy or for some keys: copy again on a later pass (a
            # copy writes only what the target lacks or holds older, so running it again is safe).
            with self._jobs_lock:
                if not self._queued(domain):  # unless a newer copy replaced it
                    self._jobs.append((domain, direction))
        return progress

    def _finished(self, domain: str) -> None:
        if self._on_copy_done is not None:
            self._on_copy_done(domain)
