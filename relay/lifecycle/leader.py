"""A leader lease: a store lock with a TTL that one relay process holds while it runs the shared sweeps.

The holder extends the lease once per sweep period; the TTL spans several periods, so a leader that
dies (or loses the store) is replaced by another process within one TTL, and a leader that pauses
longer than the TTL simply finds the lease taken and stops leading. A brief overlap of two leaders is
harmless: every sweep claims records atomically. With the memory backend, the lease is a lock in this
process's memory, which it always gets.
"""
from __future__ import annotations

import logging

from middleware.routing import StoreProvider
from relay.stores.base import StoreError

log = logging.getLogger("relay.sweeps")


class LeaderLease:
    """The lock ``name`` in one domain's store, held under ``token`` (this process's instance id)."""

    def __init__(self, store: StoreProvider, name: str, token: str, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be > 0")
        self._store = store
        self.name = name
        self.token = token
        self.ttl_ms = ttl_ms
        self.held = False

    def hold(self) -> bool:
        """Keep the lease or take it if free; ``True`` while this process leads.

        Extending first also recovers a lease whose acquisition answer was lost on the way back.
        A store failure means not leading for this period.
        """
        try:
            store = self._store()
            held = store.extend_lock(self.name, self.token, self.ttl_ms) or store.acquire_lock(
                self.name, self.token, self.ttl_ms)
        except StoreError as exc:
            held = False
            log.warning("leader lease check failed: %s", type(exc).__name__,
                        extra={"event": "lease_failed", "error": type(exc).__name__})
        if held != self.held:
            log.info("%s the %s lease", "took" if held else "lost", self.name,
                     extra={"event": "lease_taken" if held else "lease_lost", "lease": self.name})
        self.held = held
        return held

    def release(self) -> None:
        """Give the lease up (on a clean stop) so another process takes over at its next period."""
        if not self.held:
            return
        self.held = False
        try:
            self._store().release_lock(self.name, self.token)
        except StoreError as exc:
            log.warning("leader lease release failed: %s", type(exc).__name__,
                        extra={"event": "lease_failed", "error": type(exc).__name__})
