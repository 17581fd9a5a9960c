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

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import marshmallow
from marshmallow import fields

from middleware.routing import StoreProvider
from relay.stores.domain import Claimable, Domain, DomainStore
from relay.stores.envelope import Entry, EnvelopeSchema, parse_iso_ms

INDEX = "updated"
PAGE = 200
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
        self._index_later(store, new)
        written, claimed = store.write_then_claim(command_id, known, new, claimable)
        return claimed if written else None

    def _index_later(self, store: DomainStore, record: Record) -> None:
        """The record's index entry, sent with the unit of work's next round trip (its write's)."""
        store.index_add_capped(INDEX, {record["commandId"]: _score(record)}, self.max_records, defer=True)

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
        claim ``claimable`` once it is written. The index entry is deferred before each write, so
        it rides with the write's round trip (an attempt that loses the race re-scores an entry
        the next attempt scores again). Returns whether ``change`` added anything (``False`` when it
        returned ``None``) and whether the claim succeeded."""
        store = self._store()
        added = False

        def indexed(current: Optional[Record]) -> Optional[Record]:
            nonlocal added
            new = change(current)
            added = new is not None
            if added:
                self._index_later(store, new)
            return new

        _, claimed = store.update_then_claim(command_id, indexed, claimable)
        return added, claimed

    def get(self, command_id: str) -> Optional[dict[str, Any]]:
        return self._store().get(command_id)

    def prefetch(self, command_id: str) -> None:
        """``get`` or ``apply`` will be asked for this command: read it with the next round trip."""
        self._store().prefetch(command_id)

    def _newest(self, page_size: int = PAGE, needles: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Records newest first, fetched ``page_size`` at a time. With ``needles``, only those whose
        stored text holds every needle are decoded and given; the others are passed over."""
        store = self._store()
        max_score: Optional[float] = None
        seen: set[str] = set()
        while True:
            page = store.index_range(INDEX, limit=page_size, newest_first=True, max_score=max_score)
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
                store.index_remove(INDEX, gone)
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
        out = []
        # Unfiltered, the first ``limit`` records are the answer: fetch no more than that. Filtered,
        # every record may have to be looked at; those that cannot match are not decoded.
        filters = [value for value in (user_id, machine_id, status) if value]
        needles = [needle for needle in map(stored_form, filters) if needle is not None]
        for record in self._newest(PAGE if filters else min(PAGE, limit + 1), needles):
            if user_id and record.get("userId") != user_id:
                continue
            if machine_id and record.get("machineId") != machine_id:
                continue
            if status and record.get("status") != status:
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    def count(self) -> int:
        return self._store().index_count(INDEX)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self._newest():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts
