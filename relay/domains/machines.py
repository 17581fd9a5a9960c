"""Machine sessions: which agent socket speaks for a machine, and when it was last heard.

Records expire with the machine TTL (2 x heartbeat timeout by default) and are
refreshed by each heartbeat. A heartbeat rewrites the whole record from the
socket's own session, so an expired record is restored whole (never the
partial "ghost" record of reference §13 item 14).
"""
from __future__ import annotations

from typing import Any, Optional

import marshmallow
from marshmallow import fields

from middleware.routing import StoreProvider
from relay.stores.domain import Domain
from relay.stores.envelope import EnvelopeSchema

INDEX = "all"


class MachineSchema(marshmallow.Schema):
    machineId = fields.String(required=True)
    connectedAt = fields.Integer(required=True)
    lastHeartbeatAt = fields.Integer(required=True)
    runningCount = fields.Integer(required=True)
    pendingCount = fields.Integer(required=True)
    sessionId = fields.String(required=True)
    #: The relay instance (host:pid) holding the socket, for cross-instance routing.
    holder = fields.String(load_default=None, allow_none=True)


DOMAIN = Domain("machines", EnvelopeSchema(1, MachineSchema()), colocated=True)


class MachineRegistry:
    def __init__(self, store: StoreProvider, ttl_ms: int, heartbeat_timeout_ms: int) -> None:
        self._store = store
        self.ttl_ms = ttl_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms

    def register(self, record: dict[str, Any]) -> None:
        store = self._store()
        store.set(record["machineId"], record, self.ttl_ms)
        store.index_add(INDEX, {record["machineId"]: float(record["connectedAt"])})

    def heartbeat(self, record: dict[str, Any]) -> bool:
        """Refresh a machine for the session in ``record``.

        Returns ``False`` (and writes nothing) when another session has taken the machine over.
        """
        store = self._store()
        machine_id = record["machineId"]

        def change(current: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
            if current is not None and current["sessionId"] != record["sessionId"]:
                return None
            return record

        result = store.update(machine_id, change, self.ttl_ms)
        if result is record:
            store.index_add(INDEX, {machine_id: float(record["connectedAt"])})
            return True
        return False

    def remove(self, machine_id: str, session_id: str) -> bool:
        """Remove the record only while it still belongs to ``session_id``."""
        store = self._store()
        entry = store.get_entry(machine_id)
        if entry is None or entry.data["sessionId"] != session_id:
            return False
        removed = store.delete_if(machine_id, entry)
        if removed:
            store.index_remove(INDEX, [machine_id])
        return removed

    def get(self, machine_id: str) -> Optional[dict[str, Any]]:
        return self._store().get(machine_id)

    def prefetch(self, machine_id: str) -> None:
        """``get`` will be asked for this machine: read it with the unit of work's next round trip."""
        self._store().prefetch(machine_id)

    def list(self) -> list[dict[str, Any]]:
        """Live records in connection order; index entries of expired records are tidied away."""
        store = self._store()
        ids = [member for member, _ in store.index_range(INDEX, newest_first=False)]
        records = store.mget(ids) if ids else []
        gone = [i for i, r in zip(ids, records) if r is None]
        if gone:
            store.index_remove(INDEX, gone)
        return [r for r in records if r is not None]

    def is_stale(self, record: dict[str, Any], now_ms: int) -> bool:
        return now_ms - record["lastHeartbeatAt"] > self.heartbeat_timeout_ms
