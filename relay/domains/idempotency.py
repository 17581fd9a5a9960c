"""Message-id idempotency: a msgId is reserved once, for a TTL (24 h by default)."""
from __future__ import annotations

import marshmallow
from marshmallow import fields

from middleware.routing import StoreProvider
from relay.stores.domain import Domain, Hit
from relay.stores.envelope import EnvelopeSchema


class ReservationSchema(marshmallow.Schema):
    reservedAtMs = fields.Integer(required=True)


DOMAIN = Domain("idempotency", EnvelopeSchema(1, ReservationSchema()))


class IdempotencyKeys:
    def __init__(self, store: StoreProvider, ttl_ms: int) -> None:
        self._store = store
        self.ttl_ms = ttl_ms

    def reserve(self, key: str, now_ms: int) -> bool:
        """``True`` when this call reserved ``key``; ``False`` when it was already seen."""
        return self._store().set_if_absent(key, {"reservedAtMs": now_ms}, self.ttl_ms)

    def reserve_within(self, key: str, now_ms: int, hit: Hit) -> tuple[bool, bool]:
        """Count ``hit`` (a rate-limit hit) and reserve ``key`` only when the hit is within its limit,
        in one round trip where the stores allow. Returns ``(allowed, reserved)``."""
        count, reserved = self._store().set_if_absent_within(key, {"reservedAtMs": now_ms}, self.ttl_ms, hit)
        return count <= hit.guard.limit, reserved

    def release(self, key: str) -> None:
        """Forget a reservation whose request failed, so the sender's retry is processed."""
        self._store().delete(key)

    def seen(self, key: str) -> bool:
        return self._store().get(key) is not None
