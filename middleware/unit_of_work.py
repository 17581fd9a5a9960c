"""Units of work: the Redis calls of one request, frame or sweep, in as few round trips as they allow.

``StoreRouter.bound`` opens a ``UnitOfWork`` for each scope (``begin``/``end`` here). Routed stores
whose plan allows it (``RoutedStore.batching``: Redis authoritative, no mirror, no copy running, no
shadow reads) send their Redis calls through it:

* ``defer``: a plain write nobody waits for (``DEFERRABLE_OPS``) is queued, not sent;
* ``follow``: the same, but sent right after the next call that carries the queue, in its pipeline
  (an audit record's index entry after the record's compare-and-set: a reader that finds the entry
  finds the record as written);
* ``prefetch``: a read the unit of work will make is queued; its answer is kept for the next ``get``
  of that key (until the unit of work writes the key);
* every other call sends the queued writes and reads first, in the same pipeline
  (``Store.execute``): one round trip for all of them; ``flush`` sends the queue alone, and the end
  of the scope flushes what is left.

Queued writes are sent before anything that follows them in the same unit of work reads or
decides, so the unit of work reads its own writes. What other units of work see: a deferred write
is invisible until it is sent, so code that must make a write visible before it tells someone else
(a command sent to an agent whose answer will look for its in-flight record) flushes first.

While a backend refuses calls (its breaker open), the unit of work asks it once: the refusal holds
for the rest of the unit of work (``refuses``), and the calls refused meanwhile are counted on the
backend together when it ends. A unit of work that began on memory during an outage stays there;
the next one makes the half-open trial.

Failures keep the routed store's contract: when the pipeline fails, each queued write whose domain
may fall back to memory is written there and journalled for write-back (like any fallback write),
and a queued write that may not makes the call fail; the call that carried the queue then fails or
falls back by its own store's rules.
"""
from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from relay.stores.base import DEFERRABLE_OPS, PIPELINE_OPS, READ_OPS, Op, Store, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from middleware.routed_store import RoutedStore

log = logging.getLogger("relay.store")

_MISSING = object()


class Recorder:
    """Stands in for a backend: a call on it returns the call as an ``Op`` instead of running it.

    Each operation's recording function is kept on the instance once made: Python calls
    ``__getattr__`` only after the ordinary lookup has failed, which builds an ``AttributeError``."""

    def __getattr__(self, name: str) -> Callable[..., Op]:
        def record(*args: Any) -> Op:
            return Op(name, args)

        self.__dict__[name] = record
        return record


RECORDER = Recorder()


@dataclass(slots=True)
class _Queued:
    """A call waiting for the unit of work's next round trip (not frozen: cheaper to make, as
    ``relay.stores.redis._Queued``)."""

    store: "RoutedStore"
    label: str
    op: Op
    #: A ``prefetch``: its answer is kept for the next ``get`` of the key.
    prefetch: bool = False


class UnitOfWork:
    """The queue and read cache of one unit of work (one thread at a time)."""

    def __init__(self) -> None:
        self._queue: list[_Queued] = []
        #: Writes to send right after the next call that carries the queue (``follow``).
        self._following: list[_Queued] = []
        self._prefetching: set[str] = set()
        self._cache: dict[str, Optional[str]] = {}
        #: Round trips this unit of work made (``Store.execute`` calls).
        self.round_trips = 0
        #: Backends that refused a call here, with the calls refused since without asking them.
        self._refusing: dict[Store, int] = {}

    # -- what routed stores call --------------------------------------------------------------------
    def defer(self, store: "RoutedStore", label: str, op: Op) -> None:
        if op.name not in DEFERRABLE_OPS:
            raise ValueError(f"{op.name} cannot be deferred")
        self._forget(op)
        self._queue.append(_Queued(store, label, op))

    def follow(self, store: "RoutedStore", label: str, op: Op) -> None:
        """A plain write to send after the next call that carries the queue, in its round trip (at the
        latest when the unit of work ends): whoever reads its effect then finds that call's too."""
        if op.name not in DEFERRABLE_OPS:
            raise ValueError(f"{op.name} cannot be deferred")
        self._forget(op)
        self._following.append(_Queued(store, label, op))

    def prefetch(self, store: "RoutedStore", key: str) -> None:
        if key in self._cache or key in self._prefetching:
            return
        self._prefetching.add(key)
        self._queue.append(_Queued(store, "get", Op("get", (key,)), prefetch=True))

    def cached(self, op: Op) -> Any:
        """The prefetched answer of a ``get``, or ``_MISSING``."""
        if op.name != "get":
            return _MISSING
        return self._cache.get(op.args[0], _MISSING)

    def run(self, store: "RoutedStore", backend: Store, label: str, op: Op) -> Any:
        """Run ``op`` on ``backend`` with the queue in front of it: one round trip."""
        hit = self.cached(op)
        if hit is not _MISSING:
            return hit
        if op.name not in PIPELINE_OPS:
            # It carries nothing: the follow-ups wait for the next call that does, or the end.
            following, self._following = self._following, []
            self.flush()
            self._following = following
            return self._direct(store, backend, label, op)
        carried = _Queued(store, label, op)
        if op.name == "get" and op.args[0] in self._prefetching:
            # Its own prefetch is queued: that read carries the queue, sent last, not a second GET.
            queued = [item for item in self._take() if not (item.prefetch and item.op == op)]
            carried.prefetch = True
        else:
            queued = self._take()
        if any(item.store.fallback_to_memory != store.fallback_to_memory for item in queued):
            # A failure would be handled differently for the queue and for this call: send them apart.
            self._send(backend, queued)
            queued = []
        self._forget(op)
        following, self._following = self._following, []
        results = self._send(backend, queued + [carried] + following, carried=len(queued))
        return results[len(queued)]

    def refuses(self, backend: Store) -> bool:
        """Whether ``backend`` refuses calls (``Store.refuses_calls``). It is asked until it refuses
        one; from then on the answer holds for the rest of the unit of work, and ``close`` counts
        the calls refused without asking."""
        refused = self._refusing.get(backend)
        if refused is None:
            if not backend.refuses_calls():
                return False
            self._refusing[backend] = 0
        else:
            self._refusing[backend] = refused + 1
        return True

    def close(self) -> None:
        """Count on each backend the calls this unit of work refused without asking it."""
        refusing, self._refusing = self._refusing, {}
        for backend, calls in refusing.items():
            if calls:
                backend.count_refused(calls)

    def flush(self) -> None:
        """Send the queue now, its follow-ups last (nothing happens when both are empty)."""
        queued = self._take() + self._following
        self._following = []
        if queued:
            self._send(queued[0].store.batch_backend, queued)

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._following)

    # -- internals ----------------------------------------------------------------------------------
    def _take(self) -> list[_Queued]:
        queued, self._queue = self._queue, []
        self._prefetching.clear()
        return queued

    def _forget(self, op: Op) -> None:
        """A write to a key makes what was read of it stale, and so does a write queued after the
        key's prefetch: that read still goes out, but its answer is not kept."""
        if op.name not in READ_OPS:
            for key in op.keys():
                self._cache.pop(key, None)
                if key in self._prefetching:
                    self._prefetching.discard(key)
                    for item in self._queue:
                        if item.prefetch and item.op.args[0] == key:
                            item.prefetch = False

    def _direct(self, store: "RoutedStore", backend: Store, label: str, op: Op) -> Any:
        started = time.perf_counter()
        self.round_trips += 1
        try:
            result = op.run(backend)
        except StoreError as exc:
            store.report(label, exc, time.perf_counter() - started)
            raise
        store.report(label, None, time.perf_counter() - started)
        return result

    def _send(self, backend: Store, queued: list[_Queued], carried: Optional[int] = None) -> list[Any]:
        """Execute ``queued`` in one round trip. ``carried``: the index of the call that carried the
        queue, whose failure is raised for its store to handle."""
        started = time.perf_counter()
        self.round_trips += 1
        try:
            results = backend.execute([item.op for item in queued])
        except StoreError as exc:
            seconds = time.perf_counter() - started
            for item in queued:
                item.store.report(item.label, exc, seconds)
            self._recover([item for index, item in enumerate(queued) if index != carried], exc)
            if carried is not None:
                raise
            return [None] * len(queued)
        seconds = time.perf_counter() - started
        for item, result in zip(queued, results):
            item.store.report(item.label, None, seconds)
            if item.prefetch:
                self._cache[item.op.args[0]] = result
        return results

    def _recover(self, queued: list[_Queued], error: StoreError) -> None:
        """The round trip failed: queued writes go to memory where their domain allows it."""
        lost = []
        for item in queued:
            if item.op.name in READ_OPS:
                continue
            if not item.store.fall_back(item.label, item.op):
                lost.append(item)
        if lost:
            names = sorted({f"{item.store.domain}.{item.label}" for item in lost})
            raise StoreUnavailable(f"deferred writes not stored ({', '.join(names)}): {error}") from error


_current: contextvars.ContextVar[Optional[UnitOfWork]] = contextvars.ContextVar("store_unit_of_work",
                                                                                 default=None)


#: The unit of work of the running scope, if any (the context variable's own getter: routed stores
#: ask for it on every call).
current: Callable[[], Optional[UnitOfWork]] = _current.get


def begin() -> contextvars.Token[Optional[UnitOfWork]]:
    """Open a unit of work for the running scope."""
    return _current.set(UnitOfWork())


def end(token: contextvars.Token[Optional[UnitOfWork]]) -> None:
    """Close the scope's unit of work, sending what it still queues first. A failure is logged:
    whatever had to be stored before the scope answered was flushed explicitly."""
    unit = _current.get()
    try:
        if unit is not None:
            unit.flush()
    except StoreError as exc:
        log.error("deferred store writes failed at the end of a unit of work",
                  extra={"event": "store_deferred_writes_failed", "error": type(exc).__name__})
    finally:
        _current.reset(token)
        if unit is not None:
            unit.close()

