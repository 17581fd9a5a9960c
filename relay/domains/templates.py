"""Retry templates: the command envelope of every accepted command, for ``/retry``.

Bounded by a TTL (24 h) and a maximum count (5000): the oldest are dropped at
once on insert, not only at the next sweep. ``put`` is deferred to the unit of
work's next round trip (a template is only read by a later ``/retry``).
"""
from __future__ import annotations

from typing import Any, Optional

import marshmallow
from marshmallow import fields

from middleware.routing import StoreProvider
from relay.stores.domain import Domain
from relay.stores.envelope import EnvelopeSchema

INDEX = "created"


class CommandEnvelopeSchema(marshmallow.Schema):
    commandId = fields.String(required=True)
    machineId = fields.String(required=True)
    userId = fields.String(required=True)
    kind = fields.String(required=True)
    prompt = fields.String()
    refId = fields.String()
    createdAt = fields.String(required=True)


class TemplateSchema(marshmallow.Schema):
    command = fields.Nested(CommandEnvelopeSchema, required=True)
    createdAtMs = fields.Integer(required=True)


DOMAIN = Domain("templates", EnvelopeSchema(1, TemplateSchema()), colocated=True)


class RetryTemplates:
    def __init__(self, store: StoreProvider, ttl_ms: int, max_count: int) -> None:
        self._store = store
        self.ttl_ms = ttl_ms
        self.max_count = max_count

    def put(self, command: dict[str, Any], now_ms: int) -> None:
        store = self._store()
        store.defer_set(command["commandId"], {"command": command, "createdAtMs": now_ms}, self.ttl_ms)
        store.index_add_capped(INDEX, {command["commandId"]: float(now_ms)}, self.max_count, defer=True)

    def get(self, command_id: str) -> Optional[dict[str, Any]]:
        data = self._store().get(command_id)
        return None if data is None else data["command"]

    def sweep(self, now_ms: int) -> int:
        """Drop index entries older than the TTL (their records have expired already)."""
        store = self._store()
        old = [m for m, _ in store.index_range(INDEX, newest_first=False, max_score=float(now_ms - self.ttl_ms))]
        if old:
            store.delete(*old)
        return store.index_remove(INDEX, old)
