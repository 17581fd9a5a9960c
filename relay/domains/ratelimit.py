"""Per-user fixed-window rate limit (60 callbacks a minute by default).

The window starts at a user's first hit and expires with its counter, so the
state is bounded by the number of users active in the last window.
"""
from __future__ import annotations

import marshmallow

from middleware.routing import StoreProvider
from relay.stores.domain import Domain, Hit
from relay.stores.envelope import EnvelopeSchema

WINDOW_MS = 60_000

# Counters are native integers (INCR); the schema only guards envelope values, of which this domain has none.
DOMAIN = Domain("ratelimit", EnvelopeSchema(1, marshmallow.Schema()))


class RateLimiter:
    def __init__(self, store: StoreProvider, limit: int, window_ms: int = WINDOW_MS) -> None:
        self._store = store
        self.limit = limit
        self.window_ms = window_ms

    def allow(self, user_id: str) -> bool:
        """Count a hit; ``True`` while the user is within the limit for the current window."""
        return self._store().incr(user_id, 1, self.window_ms) <= self.limit

    def hit(self, user_id: str) -> Hit:
        """The user's next hit, to count together with a reservation (``IdempotencyKeys.reserve_within``)."""
        return self._store().hit(user_id, 1, self.window_ms, self.limit)
