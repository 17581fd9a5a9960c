"""The audit index: one record per command with its events, newest first.

Each record is updated with compare-and-set, so concurrent events for one
command (a result racing the dispatch, two instances) are never lost or applied
twice (reference §13 items 8, 9, 13). Rules that differ from the reference on purpose:

* an event already present in the record (same timestamp, status and fields) is
  not appended again, which makes replaying the JSONL log idempotent;
* the record status never goes backwards: once an ``agent_*`` result is recorded,
  progress events (``sent_to_agent``, ``cancel_sent``, ``result_push_*`` ...) are
  appended but do not replace it (reference §13 item 12); ``updatedAt`` never
  moves back in time;
* a record keeps at most ``max_events`` events: the first (``created``) and the newest.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Optional

import marshmallow
from marshmallow import fields

from middleware.routing import StoreProvider
from relay.jsontext import parse
from relay.stores.base import Op
from relay.stores.domain import Claimable, Domain, DomainStore
from relay.stores.envelope import Entry, EnvelopeSchema, parse_iso_ms

INDEX = "updated"
PAGE = 200
#: The fields ``/audit/recent`` filters on; each value has an index of its records (``value_index``).
FILTER_FIELDS = ("userId", "machineId", "status")
#: How far behind the clock ``link`` stays, for writes still on their way from relays older than
#: this code (they write a record's index entry before the record, and never lower the watermark).
LINK_LAG_MS = 1_000
#: An audit record as stored (``RECORD_KEYS``).
Record = dict[str, Any]


class EventSchema(marshmallow.Schema):
    commandId = fields.String(required=True)
    timestamp = fields.String(required=True)
    status = fields.String(required=True)
    userId = fields.String()
    machineId = fields.String()
    kind = fields.String()
    summary = fields.String()
    metadata = fields.Dict(keys=fields.String(), values=fields.String())


class RecordSchema(marshmallow.Schema):
    commandId = fields.String(required=True)
    userId = fields.String()
    machineId = fields.String()
    kind = fields.String()
    createdAt = fields.String(required=True)
    updatedAt = fields.String(required=True)
    status = fields.String(required=True)
    summary = fields.String()
    events = fields.List(fields.Nested(EventSchema), required=True)


DOMAIN = Domain("audit", EnvelopeSchema(1, RecordSchema()), colocated=True)

RECORD_KEYS = ("commandId", "userId", "machineId", "kind", "createdAt", "updatedAt", "status", "summary", "events")


def status_rank(status: str) -> int:
    """Higher ranks are not replaced by lower ones as the record's status."""
    if status.startswith("agent_"):
        return 2
    if status == "inflight_timeout":
        return 1
    return 0


def apply_event(record: Optional[dict[str, Any]], event: dict[str, Any], max_events: int) -> Optional[dict[str, Any]]:
    """The record after ``event``; ``None`` when the event is already in it."""
    if record is None:
        record = {"commandId": event["commandId"], "createdAt": event["timestamp"],
                  "updatedAt": event["timestamp"], "status": event["status"], "events": []}
    elif event in record["events"]:
        return None
    else:
        record = dict(record)
        if status_rank(event["status"]) >= status_rank(record["status"]):
            record["status"] = event["status"]
        if event["timestamp"] > record["updatedAt"]:
            record["updatedAt"] = event["timestamp"]
    for name in ("userId", "machineId", "kind", "summary"):
        if event.get(name):
            record[name] = event[name]
    events = record["events"] + [event]
    if len(events) > max_events:
        events = events[:1] + events[len(events) - max_events + 1:]
    record["events"] = events
    return {k: record[k] for k in RECORD_KEYS if k in record}


def _score(record: dict[str, Any]) -> float:
    try:
        return float(parse_iso_ms(record["updatedAt"]))
    except ValueError:
        return 0.0


def _record_in(raw: Optional[str]) -> Optional[dict[str, Any]]:
    """The record data of a stored envelope, parsed but not validated; ``None`` for anything else."""
    try:
        data = parse(raw)["data"] if raw is not None else None
    except (ValueError, TypeError, KeyError):
        return None
    return data if isinstance(data, dict) else None


def value_index(field: str, value: str) -> str:
    """The index of the records whose ``field`` holds ``value``. No field name holds a ``.``, so two
    fields or values never share one, and a plain value keeps the name plain for ``index_key``."""
    return f"{field}.{value}"


def stored_form(value: str) -> Optional[str]:
    """The text ``value`` takes in any stored record whose field holds it: the quoted string, where
    every JSON encoder writes it alike (printable ASCII but ``"``, ``\\`` and ``/``, which some
    escape); else ``None``. A record without that text cannot hold the value."""
    if value.isascii() and value.isprintable() and not any(ch in value for ch in '"\\/'):
        return '"' + value + '"'
    return None


class AuditIndex:
    def __init__(self, store: StoreProvider, max_records: int, max_events: int = 200) -> None:
        self._store = store
        self.max_records = max_records
        self.max_events = max_events

    def apply(self, event: dict[str, Any]) -> bool:
        """Add ``event`` to its command's record; ``False`` when it was already there."""
        return self._update(event["commandId"], lambda current: apply_event(current, event, self.max_events))[0]

    def apply_then_claim(self, event: dict[str, Any], claimable: Claimable) -> tuple[bool, bool]:
        """``apply``, and claim ``claimable`` (the in-flight record ``event`` answers) only once the
        event is recorded: an answer is audited before its command stops being in flight, so a process
        stopped in between never loses it. Returns ``(added, claimed)``."""
        return self._update(event["commandId"], lambda current: apply_event(current, event, self.max_events),
                            claimable)

    def apply_all(self, events: list[dict[str, Any]]) -> int:
        """Add the events of one command, in order, with one update (``apply`` each would read and
        write the record once per event); return how many were new."""
        added = 0

        def change(current: Optional[Record]) -> Optional[Record]:
            nonlocal added
            added = 0
            for event in events:
                updated = apply_event(current, event, self.max_events)
                if updated is not None:
                    current, added = updated, added + 1
            return current if added else None

        self._update(events[0]["commandId"], change)
        return added

    def open(self, events: list[dict[str, Any]], flush: bool = False) -> Entry:
        """Record the first events of a new command, whose id is fresh (so no record exists yet):
        the record and its index entry are written once, with the unit of work's next round trip
        (``flush``: now). Returns the record as written."""
        record: Optional[dict[str, Any]] = None
        for event in events:
            record = apply_event(record, event, self.max_events) or record
        assert record is not None, "open() needs at least one event"
        store = self._store()
        written = store.defer_set(record["commandId"], record)
        self._index_later(store, record)
        if flush:
            store.flush()
        return written

    def apply_to_known_then_claim(self, event: dict[str, Any], known: Entry,
                                  claimable: Optional[Claimable]) -> Optional[bool]:
        """``apply_then_claim`` without reading the record: ``known`` is the record as this process
        wrote it (``open``) and stands for the read. One attempt: ``None`` when the record is no longer
        ``known`` (nothing written, nothing claimed: decide again from a read) or already holds the
        event; else whether the claim succeeded."""
        command_id = event["commandId"]
        new = apply_event(known.data, event, self.max_events)
        if new is None:
            return None
        store = self._store()
        written, claimed = store.write_then_claim(command_id, known, new, claimable, then=self._index_entry(store))
        return claimed if written else None

    def _index_later(self, store: DomainStore, record: Record) -> None:
        """The index entry of a record whose write is deferred before it: sent after it, with the unit
        of work's next round trip."""
        store.defer(self._index_entry(store)(record))

    def _index_entry(self, store: DomainStore) -> Callable[[Record], Op]:
        """The write of a record's index entry, to follow the record's own write: a linking pass that
        finds the entry then finds the record as written. An entry at or below the linking watermark
        lowers it (``link``)."""
        def entry(record: Record) -> Op:
            return store.index_add_capped_op(INDEX, {record["commandId"]: _score(record)}, self.max_records,
                                             watermarked=True)

        return entry

    def retract(self, opened: dict[str, Any], early: dict[str, Any], replacement: dict[str, Any]) -> bool:
        """``opened`` (from ``open``) holds ``early``, an event that did not happen after all (a
        dispatch that then failed): while the record is still exactly ``opened``, ``early`` is replaced
        by ``replacement``; once anything else was added, ``replacement`` is added like ``apply`` does."""
        def change(current: Optional[Record]) -> Optional[Record]:
            if current == opened:
                current = None
                for event in opened["events"]:
                    if event != early:
                        current = apply_event(current, event, self.max_events) or current
            return apply_event(current, replacement, self.max_events)

        return self._update(opened["commandId"], change)[0]

    def _update(self, command_id: str, change: Callable[[Optional[Record]], Optional[Record]],
                claimable: Optional[Claimable] = None) -> tuple[bool, bool]:
        """Replace the record with ``change(record)`` (retried on a concurrent write), index it and
        claim ``claimable`` once it is written. Each attempt's index entry follows its write, in the
        write's round trip (in a unit of work an attempt that loses the race still sends it,
        re-scoring an entry the next attempt scores again; elsewhere only a write that succeeded
        does). Returns whether ``change`` added anything (``False`` when it returned ``None``) and
        whether the claim succeeded."""
        store = self._store()
        added = False

        def tracked(current: Optional[Record]) -> Optional[Record]:
            nonlocal added
            new = change(current)
            added = new is not None
            return new

        _, claimed = store.update_then_claim(command_id, tracked, claimable, then=self._index_entry(store))
        return added, claimed

    def get(self, command_id: str) -> Optional[dict[str, Any]]:
        return self._store().get(command_id)

    def prefetch(self, command_id: str) -> None:
        """``get`` or ``apply`` will be asked for this command: read it with the next round trip."""
        self._store().prefetch(command_id)

    def _newest(self, page_size: int = PAGE, needles: Sequence[str] = (), index: str = INDEX,
                min_score: Optional[float] = None, max_score: Optional[float] = None) -> Iterator[dict[str, Any]]:
        """Records of ``index`` newest first, fetched ``page_size`` at a time, within the scores given.
        With ``needles``, only those whose stored text holds every needle are decoded and given; the
        others are passed over. Members whose record is gone leave ``index``."""
        store = self._store()
        seen: set[str] = set()
        while True:
            page = store.index_range(index, limit=page_size, newest_first=True, min_score=min_score,
                                     max_score=max_score)
            fresh = [(m, s) for m, s in page if m not in seen]
            if not fresh:
                return
            ids = [m for m, _ in fresh]
            seen.update(ids)
            gone, records = [], []
            for command_id, (key, raw) in zip(ids, store.mget_raw(ids)):
                if raw is not None and not all(needle in raw for needle in needles):
                    continue
                entry = store.decode(key, raw)
                if entry is None:
                    gone.append(command_id)
                else:
                    records.append(entry.data)
            if gone:
                store.index_remove(index, gone)
            yield from records
            if len(page) < page_size:
                return
            max_score = page[-1][1]

    def list_recent(
        self,
        limit: int,
        user_id: Optional[str] = None,
        machine_id: Optional[str] = None,
        status: Optional[str] = None,
    ) -> list[dict[str, Any]]:
        limit = max(1, limit)
        wanted = {name: value for name, value in zip(FILTER_FIELDS, (user_id, machine_id, status)) if value}
        if not wanted:
            # The first ``limit`` records are the answer: fetch no more than that.
            return list(islice(self._newest(min(PAGE, limit + 1)), limit))
        out: list[dict[str, Any]] = []
        given: set[str] = set()
        for record in self._filtered(wanted):
            if record["commandId"] in given or any(record.get(name) != value for name, value in wanted.items()):
                continue
            given.add(record["commandId"])
            out.append(record)
            if len(out) >= limit:
                break
        return out

    def _filtered(self, wanted: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Newest first, the records that may hold the ``wanted`` values. Records that cannot are not
        decoded (``stored_form``). Up to the linked watermark (``link``), only those in the index of
        one wanted value are read; above it, and everywhere when nothing was linked yet, all are."""
        needles = [needle for needle in map(stored_form, wanted.values()) if needle is not None]
        through = self._store().watermark(INDEX)
        if through is None:
            yield from self._newest(PAGE, needles)
            return
        yield from self._newest(PAGE, needles, min_score=through + 0.5)
        name, value = next(iter(wanted.items()))
        yield from self._newest(PAGE, needles, index=value_index(name, value), max_score=through)

    def link(self, now_ms: int, page_size: int = PAGE) -> int:
        """Add the records updated since the last call, up to ``LINK_LAG_MS`` before ``now_ms``, to the
        index of each of their filter values (``value_index``), whoever wrote them, and move the
        watermark of ``#updated`` to there; return how many records were read. The sweeps' leader
        calls it every few seconds.

        The watermark (``Store.watermark_begin``) never vouches for a record it did not see linked:
        a record written at or below the pass's end (its writer's clock behind, a record copied back
        after an outage), its index entry written after it, lowers it as that entry is written, so
        the pass ends below that record and the next one links it. Two calls at once are safe: the
        later one to begin moves the watermark, the other moves nothing."""
        store = self._store()
        upto = float(now_ms - LINK_LAG_MS)
        through = store.watermark(INDEX)
        if through is not None and through >= upto:
            return 0
        low = store.watermark_begin(INDEX, upto)
        low = None if low is None else low + 0.5
        linked = 0
        touched: set[str] = set()
        done: set[str] = set()
        while True:
            page = store.index_range(INDEX, limit=page_size, newest_first=False, min_score=low, max_score=upto)
            if len(page) == page_size and page[0][1] == page[-1][1]:
                # ``page_size`` records or more share one score: take them all, then go past it.
                score = page[0][1]
                page = store.index_range(INDEX, newest_first=False, min_score=score, max_score=score)
                linked += self._link_page(store, [entry for entry in page if entry[0] not in done], touched)
                low, done = score + 0.5, set()
                continue
            linked += self._link_page(store, [entry for entry in page if entry[0] not in done], touched)
            if len(page) < page_size:
                break
            time.sleep(0)  # under gevent the sweeps share the event loop with the requests
            low = page[-1][1]
            done = {m for m, score in page if score == low}
        # Each index added to keeps at most ``max_records``: what it drops left ``#updated`` before.
        for index in touched:
            store.defer_index_trim(index, self.max_records)
        store.flush()
        store.watermark_end(INDEX, upto)
        return linked

    @staticmethod
    def _link_page(store: DomainStore, entries: list[tuple[str, float]], touched: set[str]) -> int:
        """Each record's id into the index of each of its filter values, at its score, and out of
        the indexes of the statuses its events say it had before; the indexes added to join
        ``touched``. Returns how many entries there were. The records are only parsed: what they
        hold was validated when written, and nothing here is written back."""
        if not entries:
            return 0
        members: dict[str, dict[str, float]] = {}
        left: dict[str, list[str]] = {}
        for (command_id, score), (_, raw) in zip(entries, store.mget_raw([m for m, _ in entries])):
            record = _record_in(raw)
            if record is None:
                continue
            for name in FILTER_FIELDS:
                value = record.get(name)
                if isinstance(value, str) and value:
                    members.setdefault(value_index(name, value), {})[command_id] = score
            for past in {event.get("status") for event in record.get("events") or () if isinstance(event, dict)} \
                    - {record.get("status")}:
                if isinstance(past, str) and past:
                    left.setdefault(value_index("status", past), []).append(command_id)
        if members:
            store.defer_index_add_each(members)
        for index, gone in left.items():
            store.index_remove(index, gone, defer=True)
        store.flush()
        touched.update(members)
        return len(entries)

    def count(self) -> int:
        return self._store().index_count(INDEX)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self._newest():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts
