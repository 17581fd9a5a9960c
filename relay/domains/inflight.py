"""Commands sent to an agent and not yet answered."""
from __future__ import annotations

from typing import Any, Optional

import marshmallow
from marshmallow import fields

from middleware.routing import StoreProvider
from relay.stores.domain import Claimable, Domain
from relay.stores.envelope import Entry, EnvelopeSchema

INDEX = "created"


class InflightSchema(marshmallow.Schema):
    commandId = fields.String(required=True)
    userId = fields.String(required=True)
    machineId = fields.String(required=True)
    kind = fields.String(required=True)
    createdAtMs = fields.Integer(required=True)


DOMAIN = Domain("inflight", EnvelopeSchema(1, InflightSchema()), colocated=True)


class InflightCommands:
    def __init__(self, store: StoreProvider, ttl_ms: int) -> None:
        self._store = store
        self.ttl_ms = ttl_ms

    def put(self, record: dict[str, Any]) -> Entry:
        """Store the record, and everything the unit of work deferred before it, in one round trip:
        once this returns, the agent's answer finds the record. Returns it as written."""
        store = self._store()
        written = store.defer_set(record["commandId"], record, self.ttl_ms)
        store.defer_index_add(INDEX, {record["commandId"]: float(record["createdAtMs"])})
        store.flush()
        return written

    def get(self, command_id: str) -> Optional[dict[str, Any]]:
        return self._store().get(command_id)

    def prefetch(self, command_id: str) -> None:
        """``get`` or ``claim`` will be asked for this command: read it with the next round trip."""
        self._store().prefetch(command_id)

    def claim(self, command_id: str) -> Optional[dict[str, Any]]:
        """Remove and return the record; ``None`` when absent or claimed by someone else first. The
        index entry goes after the claim, so a claim that fails leaves the command to the sweep."""
        store = self._store()
        entry = store.get_entry(command_id)
        if entry is None:
            return None
        claimed = store.delete_if(command_id, entry)
        store.index_remove(INDEX, [command_id], defer=True)
        return entry.data if claimed else None

    def answered(self, command_id: str, known: Optional[Entry] = None) -> Optional[Claimable]:
        """The record of a command whose answer is being audited, to be claimed by that audit write
        (``AuditIndex.apply_then_claim``); ``None`` when there is none.

        The claim removes the index entry, then the record while unchanged, and only once the answer
        is written: one round trip with the audit write where both domains live on one Redis. The
        index entry only lets the timeout sweep find the command, and the sweep would release an
        answered one without a word, so it goes even when the record changed meanwhile; such a record
        is left to expire with its TTL (``get`` still finds it until then, and a second answer can
        still claim it). ``known``: the record as this process wrote it (``put``), instead of reading
        it; a claim of a record changed since fails."""
        return self._store().claimable(command_id, INDEX, known)

    def remove(self, command_id: str) -> None:
        store = self._store()
        store.delete(command_id)
        store.index_remove(INDEX, [command_id])

    def list(self, older_than_ms: Optional[int] = None) -> list[dict[str, Any]]:
        """Records oldest first; with ``older_than_ms``, only those created before it."""
        store = self._store()
        max_score = None if older_than_ms is None else float(older_than_ms) - 0.5
        ids = [m for m, _ in store.index_range(INDEX, newest_first=False, max_score=max_score)]
        records = store.mget(ids) if ids else []
        gone = [i for i, r in zip(ids, records) if r is None]
        if gone:
            store.index_remove(INDEX, gone)
        return [r for r in records if r is not None]

    def count(self) -> int:
        return self._store().index_count(INDEX)
