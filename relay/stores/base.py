"""The backend-agnostic store interface.

A ``Store`` holds serialized values (``str``, normally an envelope written by
``relay.stores.envelope``) under full key strings built by ``relay.stores.keys``.
Business code never talks to a ``Store`` directly: it uses a ``DomainStore``
(``relay.stores.domain``), which binds one domain's key space and schema.

Semantics every backend keeps (the contract suite in ``tests/stores`` checks them):

* TTLs are integer milliseconds; ``None`` means no expiry. Zero, negative,
  fractional or non-numeric TTLs raise ``ValueError`` before anything is written.
* An expired key is invisible at once.
* Values must be ``str`` no larger than ``max_value_bytes`` (UTF-8) or
  ``ValueTooLarge``/``TypeError`` is raised before any write.
* Counters (``incr``), locks and sorted indexes are native types, not
  envelopes; a key holds one kind of thing only.
* A watermark (``watermark_begin``) is a sorted index of its own, kept over
  another index by whoever works through that index in score order.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from relay.stores.keys import escape_id

DEFAULT_MAX_VALUE_BYTES = 1024 * 1024

#: A watermark's members: every member of its index scored at or below ``THROUGH`` was worked
#: through; a pass up to ``TARGET`` is under way; ``LATE`` is the lowest score added to the index at
#: or below either since (``Store.watermark_lower``), which the watermark no longer vouches for.
THROUGH, TARGET, LATE = "through", "target", "late"


class StoreError(Exception):
    """A backend failed (connection, timeout, open breaker, server error)."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or did not answer in time."""


class ValueTooLarge(ValueError):
    """A value is larger than the configured cap; nothing was written."""


def validate_ttl(ttl_ms: object) -> Optional[int]:
    """Return ``ttl_ms`` when it is ``None`` or a positive integer, else raise ``ValueError``."""
    if ttl_ms is None:
        return None
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int):
        raise ValueError(f"ttl_ms must be a positive integer of milliseconds or None, got {ttl_ms!r}")
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
    return ttl_ms


def validate_lock_ttl(ttl_ms: object) -> int:
    """Like ``validate_ttl``, but a lock always expires: ``None`` is refused too."""
    if ttl_ms is None:
        raise ValueError("a lock needs a TTL in milliseconds")
    return validate_ttl(ttl_ms)  # type: ignore[return-value]


def validate_value(value: object, max_value_bytes: int) -> str:
    """Check a serialized value before it is written."""
    if not isinstance(value, str):
        raise TypeError(f"store values are serialized strings, got {type(value).__name__}")
    size = len(value.encode("utf-8"))
    if size > max_value_bytes:
        raise ValueTooLarge(f"value of {size} bytes exceeds the cap of {max_value_bytes} bytes")
    return value


def validate_limit(limit: object) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


@dataclass(frozen=True)
class CounterGuard:
    """A hit counted before a reservation: add ``amount`` to the counter ``key`` (created with
    ``ttl_ms``) and reserve only while the new count is at most ``limit``."""

    key: str
    amount: int
    ttl_ms: Optional[int]
    limit: int


def vouched(marks: Mapping[str, float]) -> Optional[float]:
    """What a watermark's members vouch for (``THROUGH`` below the lowest ``LATE`` score)."""
    through = marks.get(THROUGH)
    late = marks.get(LATE)
    if through is None or late is None:
        return through
    return min(through, late - 0.5)


def lowered(marks: Mapping[str, float], score: float) -> Optional[float]:
    """The watermark's new ``LATE`` score once members were added at ``score``; ``None``: unchanged."""
    top = max((marks[name] for name in (THROUGH, TARGET) if name in marks), default=None)
    if top is None or score > top:
        return None
    late = marks.get(LATE)
    return score if late is None or score < late else None


class Claim(NamedTuple):
    """A record to claim once another write has succeeded (``Store.compare_and_set_then_claim``):
    delete ``key`` while it holds exactly ``expected``, and remove ``member`` from the index
    ``index_key`` (whether or not the record was still there)."""

    key: str
    expected: str
    index_key: str
    member: str


class Op(NamedTuple):
    """One ``Store`` call as data: the method ``name`` and its positional ``args``, so calls can be
    queued and sent together (``Store.execute``). A named tuple: a Redis-mode callback builds some
    17, and a frozen dataclass takes twice as long to make."""

    name: str
    args: tuple[Any, ...]

    def keys(self) -> tuple[str, ...]:
        """The keys the call touches."""
        if self.name == "delete":
            return tuple(self.args)
        if self.name in ("mget", "mset", "index_add_each"):
            return tuple(self.args[0])
        if self.name == "guarded_reserve":
            return (self.args[0].key, self.args[1])
        if self.name == "compare_and_set_then_claim":
            claim = self.args[4]
            return (self.args[0], claim.key, claim.index_key)
        return (self.args[0],)

    def run(self, store: "Store") -> Any:
        return getattr(store, self.name)(*self.args)


#: Calls that change nothing.
READ_OPS = frozenset({"get", "mget", "ttl_ms", "index_range", "index_count"})
#: Calls ``execute`` can send together (locks and introspection always go alone).
PIPELINE_OPS = READ_OPS | frozenset({"set", "mset", "delete", "set_if_absent", "compare_and_set",
                                     "compare_and_delete", "incr", "index_add", "index_remove", "index_trim",
                                     "index_add_each", "index_add_capped", "guarded_reserve",
                                     "compare_and_set_then_claim"})
#: Plain writes whose answer nobody waits for: they may be deferred to a unit of work's next round trip.
DEFERRABLE_OPS = frozenset({"set", "mset", "delete", "index_add", "index_remove", "index_trim", "index_add_each",
                            "index_add_capped"})


class Store(abc.ABC):
    """Key/value operations plus the atomic helpers correctness-critical flows need."""

    #: "memory" or "redis"; routed stores report their authoritative backend.
    backend_name: str = "abstract"

    def __init__(self, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        self.max_value_bytes = max_value_bytes

    def refuses_calls(self) -> bool:
        """``True`` when a call now would fail at once without being tried (an open circuit
        breaker); such a refusal is counted. Stores without a breaker never refuse."""
        return False

    @property
    def data_losses(self) -> int:
        """How many times this backend was found to have lost its data (``RedisStore``); 0 for stores
        that cannot lose theirs behind the process's back."""
        return 0

    def count_refused(self, calls: int) -> None:
        """Count ``calls`` refused without asking ``refuses_calls`` again, after it had said ``True``
        (``middleware.unit_of_work.UnitOfWork.refuses``)."""

    # -- plain values -----------------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: str) -> Optional[str]:
        """The value, or ``None`` when absent or expired."""

    @abc.abstractmethod
    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        """Write ``value``, replacing any value and TTL."""

    @abc.abstractmethod
    def delete(self, *keys: str) -> int:
        """Remove keys of any kind; return how many existed."""

    @abc.abstractmethod
    def mget(self, keys: Sequence[str]) -> list[Optional[str]]:
        """Values in the order of ``keys``."""

    @abc.abstractmethod
    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        """Write all items atomically, each with the same TTL."""

    # -- atomic helpers ---------------------------------------------------------------
    @abc.abstractmethod
    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        """Reserve ``key``: write only when absent; ``True`` when this call wrote it."""

    @abc.abstractmethod
    def compare_and_set(
        self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int] = None
    ) -> bool:
        """Write ``value`` only when the current value equals ``expected`` exactly.

        ``expected=None`` means "only when absent". Returns ``True`` when written.
        Domains use it for optimistic updates: read, compute, ``compare_and_set``, retry.
        """

    @abc.abstractmethod
    def compare_and_delete(self, key: str, expected: str) -> bool:
        """Delete only when the current value equals ``expected`` exactly."""

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1, ttl_ms: Optional[int] = None) -> int:
        """Add ``amount`` to an integer counter and return the new value.

        The TTL is applied only when the counter is created by this call, so a
        fixed window keeps its original expiry.
        """

    @abc.abstractmethod
    def ttl_ms(self, key: str) -> Optional[int]:
        """Remaining TTL in ms; ``None`` when the key has no expiry or does not exist."""

    # -- locks ------------------------------------------------------------------------
    @abc.abstractmethod
    def acquire_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """Take the lock for ``token`` unless another token holds it."""

    @abc.abstractmethod
    def release_lock(self, key: str, token: str) -> bool:
        """Release only when held by ``token``."""

    @abc.abstractmethod
    def extend_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """Reset the TTL only when held by ``token``."""

    # -- sorted index -----------------------------------------------------------------
    @abc.abstractmethod
    def index_add(self, key: str, members: Mapping[str, float]) -> None:
        """Add or re-score members."""

    @abc.abstractmethod
    def index_range(
        self,
        key: str,
        limit: Optional[int] = None,
        newest_first: bool = True,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
    ) -> list[tuple[str, float]]:
        """Members with scores, highest score first unless ``newest_first`` is false.

        Ties are ordered by member (lexicographically, reversed when newest first),
        as Redis orders them.
        """

    @abc.abstractmethod
    def index_remove(self, key: str, members: Iterable[str]) -> int:
        """Remove members; return how many were present."""

    @abc.abstractmethod
    def index_count(self, key: str) -> int:
        """Number of members."""

    @abc.abstractmethod
    def index_trim(self, key: str, max_size: int) -> list[str]:
        """Drop the lowest-scored members beyond ``max_size``; return them."""

    # -- compound operations (one round trip where the backend allows) -----------------------
    def index_add_each(self, adds: Mapping[str, Mapping[str, float]]) -> None:
        """``index_add`` to each index key of ``adds`` its members: one call for many indexes."""
        for key, members in adds.items():
            self.index_add(key, members)

    def index_add_capped(self, key: str, members: Mapping[str, float], max_size: int,
                         record_prefix: str, watermark: Optional[str] = None) -> list[str]:
        """``index_add``, then ``index_trim`` to ``max_size`` and delete the records of the dropped
        members (``record_prefix + escape_id(member)``); return the dropped members. With
        ``watermark`` (the key of the index's watermark), ``watermark_lower`` it to the lowest score
        added, after the add."""
        self.index_add(key, members)
        if watermark is not None and members:
            self.watermark_lower(watermark, min(members.values()))
        dropped = self.index_trim(key, max_size)
        if dropped:
            self.delete(*(record_prefix + escape_id(m) for m in dropped))
        return dropped

    def guarded_reserve(self, guard: CounterGuard, key: str, value: str, ttl_ms: Optional[int] = None,
                        counter: Optional["Store"] = None) -> tuple[int, bool]:
        """Count the ``guard``'s hit (on ``counter`` when the counter lives in another store), then,
        while the count is within its limit, ``set_if_absent``. Returns ``(count, reserved)``; nothing
        is reserved beyond the limit."""
        count = (counter or self).incr(guard.key, guard.amount, guard.ttl_ms)
        if count > guard.limit:
            return count, False
        return count, self.set_if_absent(key, value, ttl_ms)

    def compare_and_set_then_claim(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int],
                                   claim: Claim, other: Optional["Store"] = None) -> tuple[bool, bool]:
        """``compare_and_set``; only when it wrote, ``claim`` (on ``other`` when the claimed record lives
        in another store). Returns ``(written, claimed)``. A claim never happens without the write, so
        a process stopped in between leaves the record to claim, never a claim without its write."""
        if not self.compare_and_set(key, expected, value, ttl_ms):
            return False, False
        return True, (other or self).claim(claim)

    def claim(self, claim: Claim) -> bool:
        """``claim`` on its own: the index entry first, then the record while it holds exactly
        ``claim.expected``; whether the record was deleted."""
        self.index_remove(claim.index_key, [claim.member])
        return self.compare_and_delete(claim.key, claim.expected)

    def execute(self, ops: Sequence[Op]) -> list[Any]:
        """Run ``ops`` in order and return their results (one round trip on Redis; not atomic)."""
        return [op.run(self) for op in ops]

    # -- watermarks -------------------------------------------------------------------------------
    # A process that works through an index in score order (the audit records' linking) keeps a
    # watermark over it: what it has worked through. Scores are whole numbers (milliseconds). Members
    # may be added at any score, also below the watermark (a writer whose clock is behind, a record
    # copied back after an outage): each such add is remembered (``watermark_lower``), and the
    # watermark vouches only for what lies below it. So a pass need not stay behind the clock for
    # such writers: ``watermark_begin``, work through ``(start, upto]``, ``watermark_end``. Each call
    # is atomic (a lock, a Lua script), so no pass or writer comes between its steps.
    def watermark(self, key: str) -> Optional[float]:
        """The score at or below which every member of the watched index was worked through; ``None``
        before the first pass ended."""
        return vouched(dict(self.index_range(key)))

    @abc.abstractmethod
    def watermark_lower(self, key: str, score: float) -> None:
        """Members were just added at ``score`` or above: when that is at or below what the watermark
        vouches for or a pass is bringing it to, it no longer vouches for ``score`` (``lowered``)."""

    @abc.abstractmethod
    def watermark_begin(self, key: str, upto: float) -> Optional[float]:
        """Start a pass up to ``upto``: return the score to work from (exclusive; ``None``: from the
        lowest), what the watermark vouches for now, and remember ``upto`` as the pass's target. The
        late score is then the pass's to work through, unless another pass is under way (or was cut
        short): that one's late scores stay, and hold back whichever pass ends."""

    @abc.abstractmethod
    def watermark_end(self, key: str, upto: float) -> Optional[float]:
        """End the pass begun with ``upto``: the watermark moves to ``upto``, or only to below the
        lowest score added late meanwhile. A pass another began since moves nothing. Returns what the
        watermark vouches for now."""

    # -- units of work (``middleware.unit_of_work``); plain stores run everything at once --------
    def prefetch(self, keys: Sequence[str]) -> None:
        """Announce reads this unit of work will make, so they can ride along with its next round trip."""

    def defer(self, op: Op) -> None:
        """A plain write (``DEFERRABLE_OPS``) nobody waits for: sent with the unit of work's next round
        trip, at the latest when it ends. A plain store writes at once."""
        if op.name not in DEFERRABLE_OPS:
            raise ValueError(f"{op.name} cannot be deferred")
        op.run(self)

    def flush(self) -> None:
        """Send the deferred writes of this unit of work now."""

    def follow(self, op: Op) -> bool:
        """Queue ``op``, a plain write, to be sent right after the next call, in its round trip, where a
        unit of work queues writes; ``False`` (nothing done) where it does not: the caller then runs it
        after that call itself."""
        if op.name not in DEFERRABLE_OPS:
            raise ValueError(f"{op.name} cannot be deferred")
        return False

    # -- lifecycle --------------------------------------------------------------------
    def ping(self) -> bool:
        """``True`` when the backend answers."""
        return True

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
