"""``DomainStore``: one domain's view of a ``Store``, in ids and data instead of keys and text.

Domain modules (``relay.domains.*``) receive a ``DomainStore`` and nothing else.
It builds keys with the domain's ``KeySpace`` prefix, wraps data in the domain's
versioned envelope, and turns unreadable values into counted misses.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from relay.stores.base import Claim, CounterGuard, Op, Store
from relay.stores.envelope import Entry, EnvelopeError, EnvelopeSchema, iso_ms
from relay.stores.keys import KeySpace, escape_id, watermark_key

log = logging.getLogger("relay.stores")

MissListener = Callable[[str, str], None]
#: Builds, from a record about to be written, a plain write to follow it (``DomainStore.update_then_claim``).
Then = Callable[[Any], Op]


def wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Domain:
    """A state domain: its name, envelope schema and key layout."""

    name: str
    schema: EnvelopeSchema
    #: Records and domain indexes share one Redis Cluster slot (see relay.stores.keys).
    colocated: bool = False


@dataclass(frozen=True)
class Hit:
    """A hit on one domain's counter, counted together with a reservation in another
    (``DomainStore.set_if_absent_within``)."""

    store: "DomainStore"
    guard: CounterGuard


@dataclass(frozen=True)
class Claimable:
    """A record of one domain as it was read (or as this process wrote it), to claim once a write in
    another domain has succeeded (``DomainStore.update_then_claim``, ``write_then_claim``)."""

    store: "DomainStore"
    entry: Entry
    claim: Claim

    def take(self) -> bool:
        """Claim it now, on its own (``Store.claim``)."""
        return self.store.store.claim(self.claim)


class CasConflict(Exception):
    """``DomainStore.update`` lost the race too many times."""


class DomainStore:
    """Typed access to one domain's records, counters, locks and indexes."""

    def __init__(
        self,
        store: Store,
        keys: KeySpace,
        domain: Domain,
        clock: Callable[[], int] = wall_ms,
        on_miss: Optional[MissListener] = None,
    ) -> None:
        self.store = store
        self.domain = domain
        self.name = domain.name
        self._keys = keys
        self._prefix = keys.prefix(domain.name, domain.colocated)
        self._clock = clock
        self._on_miss = on_miss
        self.misses = 0

    # -- keys ---------------------------------------------------------------------------
    def key(self, id_: str) -> str:
        """``KeySpace.key`` of this domain, from the prefix built once (some 20 keys per callback)."""
        return self._prefix + escape_id(id_)

    def index_key(self, name: str) -> str:
        return self._keys.index_key(self.domain.name, name, self.domain.colocated)

    @property
    def prefix(self) -> str:
        return self._prefix

    # -- envelopes ----------------------------------------------------------------------
    def encode(self, data: Any) -> str:
        return self.domain.schema.encode(data, self._clock())

    def decode(self, key: str, raw: Optional[str]) -> Optional[Entry]:
        if raw is None:
            return None
        try:
            return self.domain.schema.decode(raw)
        except EnvelopeError as exc:
            self.misses += 1
            log.warning(
                "unreadable stored value counted as a miss",
                extra={"event": "store_miss", "domain": self.name, "reason": exc.reason},
            )
            if self._on_miss:
                self._on_miss(self.name, exc.reason)
            return None

    # -- records ------------------------------------------------------------------------
    def get_entry(self, id_: str) -> Optional[Entry]:
        key = self.key(id_)
        return self.decode(key, self.store.get(key))

    def get(self, id_: str) -> Any:
        entry = self.get_entry(id_)
        return None if entry is None else entry.data

    def mget(self, ids: Sequence[str]) -> list[Any]:
        out = []
        for key, raw in self.mget_raw(ids):
            entry = self.decode(key, raw)
            out.append(None if entry is None else entry.data)
        return out

    def mget_raw(self, ids: Sequence[str]) -> list[tuple[str, Optional[str]]]:
        """Each id's key and stored text, not decoded: for a caller that decodes only some of them."""
        keys = [self.key(i) for i in ids]
        return list(zip(keys, self.store.mget(keys)))

    def set(self, id_: str, data: Any, ttl_ms: Optional[int] = None) -> None:
        self.store.set(self.key(id_), self.encode(data), ttl_ms)

    def mset(self, items: Mapping[str, Any], ttl_ms: Optional[int] = None, defer: bool = False) -> None:
        """Write every record with the same TTL; with ``defer``, with the unit of work's next round trip."""
        op = Op("mset", ({self.key(i): self.encode(d) for i, d in items.items()}, ttl_ms))
        if defer:
            self.store.defer(op)
        else:
            self.store.mset(*op.args)

    def delete(self, *ids: str) -> int:
        return self.store.delete(*(self.key(i) for i in ids)) if ids else 0

    def set_if_absent(self, id_: str, data: Any, ttl_ms: Optional[int] = None) -> bool:
        return self.store.set_if_absent(self.key(id_), self.encode(data), ttl_ms)

    def compare_and_set(
        self, id_: str, expected: Optional[Entry], data: Any, ttl_ms: Optional[int] = None
    ) -> bool:
        return self.store.compare_and_set(
            self.key(id_), None if expected is None else expected.raw, self.encode(data), ttl_ms
        )

    def delete_if(self, id_: str, expected: Entry) -> bool:
        """Delete only when the record is still exactly ``expected``."""
        return self.store.compare_and_delete(self.key(id_), expected.raw)

    def update(
        self,
        id_: str,
        change: Callable[[Optional[Any]], Optional[Any]],
        ttl_ms: Optional[int] = None,
        attempts: int = 16,
    ) -> Optional[Any]:
        """Optimistic read-change-write: ``change(current)`` returns the new data, or
        ``None`` to leave the record as it is. Retries when another writer won."""
        return self.update_then_claim(id_, change, None, ttl_ms, attempts)[0]

    def update_then_claim(
        self,
        id_: str,
        change: Callable[[Optional[Any]], Optional[Any]],
        claimable: Optional[Claimable],
        ttl_ms: Optional[int] = None,
        attempts: int = 16,
        then: Optional[Then] = None,
    ) -> tuple[Optional[Any], bool]:
        """``update``, then ``claimable`` claimed, but only once the change is written: in the same
        call (``Store.compare_and_set_then_claim``, one round trip where both domains live on one
        Redis), or on its own when ``change`` has nothing to write. ``then(new)``: a plain write to
        follow each attempt's write (``_compare_and_set_then_claim``). Returns the record and whether
        the claim succeeded (``False`` without ``claimable``)."""
        key = self.key(id_)
        for _ in range(attempts):
            raw = self.store.get(key)
            entry = self.decode(key, raw)
            new = change(None if entry is None else entry.data)
            if new is None:
                return None if entry is None else entry.data, claimable is not None and claimable.take()
            written, claimed = self._compare_and_set_then_claim(key, raw, new, ttl_ms, claimable, then)
            if written:
                return new, claimed
        raise CasConflict(f"{self.name}: update of {id_!r} kept losing the race")

    def write_then_claim(self, id_: str, expected: Entry, data: Any, claimable: Optional[Claimable],
                         ttl_ms: Optional[int] = None, then: Optional[Then] = None) -> tuple[bool, bool]:
        """Replace the record with ``data`` only while it is still ``expected`` (an entry this process
        wrote or read earlier, standing for a read now), and then claim ``claimable``: one attempt,
        no read. ``then`` as for ``update_then_claim``. Returns ``(written, claimed)``; nothing is
        claimed unless it wrote."""
        return self._compare_and_set_then_claim(self.key(id_), expected.raw, data, ttl_ms, claimable, then)

    def _compare_and_set_then_claim(self, key: str, expected: Optional[str], data: Any, ttl_ms: Optional[int],
                                    claimable: Optional[Claimable], then: Optional[Then]) -> tuple[bool, bool]:
        """The write, and ``then(data)`` after it, so that whoever finds what ``then`` wrote (a linking
        pass finding an index entry) finds the record it follows. Where the unit of work queues
        writes, it rides in the write's own round trip, right after it (``Store.follow``)."""
        follow = None if then is None else then(data)
        queued = follow is not None and self.store.follow(follow)
        if claimable is None:
            written, claimed = self.store.compare_and_set(key, expected, self.encode(data), ttl_ms), False
        else:
            written, claimed = self.store.compare_and_set_then_claim(key, expected, self.encode(data), ttl_ms,
                                                                     claimable.claim, claimable.store.store)
        if follow is not None and written and not queued:
            self.store.defer(follow)
        return written, claimed

    def claimable(self, id_: str, index: str, entry: Optional[Entry] = None) -> Optional[Claimable]:
        """The record ``id_`` as it is now (or as ``entry``, when the caller knows it), to be claimed
        after a write elsewhere (deleted while unchanged, and removed from ``index``); ``None`` when
        there is none."""
        if entry is None:
            entry = self.get_entry(id_)
            if entry is None:
                return None
        return Claimable(self, entry, Claim(self.key(id_), entry.raw, self.index_key(index), id_))

    def ttl_ms(self, id_: str) -> Optional[int]:
        return self.store.ttl_ms(self.key(id_))

    def set_if_absent_within(self, id_: str, data: Any, ttl_ms: Optional[int], hit: Hit) -> tuple[int, bool]:
        """Count ``hit``, then reserve ``id_`` only while the count is within the hit's limit: one
        round trip when both domains live on one Redis. Returns ``(count, reserved)``."""
        return self.store.guarded_reserve(hit.guard, self.key(id_), self.encode(data), ttl_ms, hit.store.store)

    # -- units of work ------------------------------------------------------------------
    def prefetch(self, *ids: str) -> None:
        """Reads this unit of work will make: they ride along with its next round trip."""
        self.store.prefetch([self.key(i) for i in ids])

    def defer_set(self, id_: str, data: Any, ttl_ms: Optional[int] = None) -> Entry:
        """``set``, sent with the unit of work's next round trip (at the latest when it ends); returns
        the entry as written, which stands for a read of it until someone writes it again
        (``write_then_claim``)."""
        now_ms = self._clock()
        raw = self.domain.schema.encode(data, now_ms)
        self.store.defer(Op("set", (self.key(id_), raw, ttl_ms)))
        return Entry(data=data, updated_at=iso_ms(now_ms), raw=raw)

    def defer_index_add(self, index: str, members: Mapping[str, float]) -> None:
        """``index_add``, sent with the unit of work's next round trip."""
        self.store.defer(Op("index_add", (self.index_key(index), dict(members))))

    def defer_index_add_each(self, adds: Mapping[str, Mapping[str, float]]) -> None:
        """``index_add`` to each index of ``adds``, as one call sent with the unit of work's next
        round trip."""
        self.store.defer(Op("index_add_each", ({self.index_key(name): dict(members)
                                                for name, members in adds.items()},)))

    def defer_index_trim(self, index: str, max_size: int) -> None:
        """``index_trim``, sent with the unit of work's next round trip."""
        self.store.defer(Op("index_trim", (self.index_key(index), max_size)))

    def flush(self) -> None:
        """Send this unit of work's deferred writes now."""
        self.store.flush()

    # -- counters -----------------------------------------------------------------------
    def incr(self, id_: str, amount: int = 1, ttl_ms: Optional[int] = None) -> int:
        return self.store.incr(self.key(id_), amount, ttl_ms)

    def hit(self, id_: str, amount: int, ttl_ms: Optional[int], limit: int) -> Hit:
        """A hit of ``amount`` on the counter ``id_`` (window ``ttl_ms``), allowed up to ``limit``; not
        counted until passed to ``set_if_absent_within`` or ``count``."""
        return Hit(self, CounterGuard(self.key(id_), amount, ttl_ms, limit))

    def count(self, hit: Hit) -> int:
        """Count ``hit`` alone; return the new count."""
        return self.store.incr(hit.guard.key, hit.guard.amount, hit.guard.ttl_ms)

    # -- locks --------------------------------------------------------------------------
    def acquire_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        return self.store.acquire_lock(self.index_key("lock:" + name), token, ttl_ms)

    def release_lock(self, name: str, token: str) -> bool:
        return self.store.release_lock(self.index_key("lock:" + name), token)

    def extend_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        return self.store.extend_lock(self.index_key("lock:" + name), token, ttl_ms)

    # -- indexes ------------------------------------------------------------------------
    def index_add(self, index: str, members: Mapping[str, float]) -> None:
        self.store.index_add(self.index_key(index), members)

    def index_range(
        self,
        index: str,
        limit: Optional[int] = None,
        newest_first: bool = True,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
    ) -> list[tuple[str, float]]:
        return self.store.index_range(self.index_key(index), limit, newest_first, min_score, max_score)

    def index_remove(self, index: str, members: Iterable[str], defer: bool = False) -> int:
        """Remove members; return how many were there (with ``defer``: sent with the unit of work's
        next round trip, and 0)."""
        members = list(members)
        if not members:
            return 0
        if defer:
            self.store.defer(Op("index_remove", (self.index_key(index), members)))
            return 0
        return self.store.index_remove(self.index_key(index), members)

    def index_count(self, index: str) -> int:
        return self.store.index_count(self.index_key(index))

    def index_trim(self, index: str, max_size: int) -> list[str]:
        return self.store.index_trim(self.index_key(index), max_size)

    def index_add_capped(self, index: str, members: Mapping[str, float], max_size: int,
                         defer: bool = False) -> list[str]:
        """``index_add``, then drop the lowest-scored members beyond ``max_size`` together with their
        records (one round trip on Redis); return them. With ``defer`` the call is sent with the unit
        of work's next round trip and returns nothing."""
        op = self.index_add_capped_op(index, members, max_size)
        if defer:
            self.defer(op)
            return []
        return self.store.index_add_capped(*op.args)

    def defer(self, op: Op) -> None:
        """A plain write made by an ``*_op`` method: sent with the unit of work's next round trip."""
        self.store.defer(op)

    def index_add_capped_op(self, index: str, members: Mapping[str, float], max_size: int,
                            watermarked: bool = False) -> Op:
        """``index_add_capped`` as an ``Op``, to run later (``update_then_claim``'s ``then``).
        ``watermarked``: the index has a watermark (``Store.watermark_begin``), which the members
        added may lower."""
        key = self.index_key(index)
        return Op("index_add_capped", (key, dict(members), max_size, self._prefix,
                                       watermark_key(key) if watermarked else None))

    # -- watermarks (``Store.watermark_begin``) ---------------------------------------------------
    def watermark(self, index: str) -> Optional[float]:
        return self.store.watermark(watermark_key(self.index_key(index)))

    def watermark_begin(self, index: str, upto: float) -> Optional[float]:
        return self.store.watermark_begin(watermark_key(self.index_key(index)), upto)

    def watermark_end(self, index: str, upto: float) -> Optional[float]:
        return self.store.watermark_end(watermark_key(self.index_key(index)), upto)
