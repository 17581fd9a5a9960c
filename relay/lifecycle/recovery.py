"""Putting state back after the store lost it, and hydrating the audit once the store answers.

When Redis loses its data (a restart without persistence, a flush; ``RedisStore.watch_data_loss``
notices), each process puts back what it can, so accepted commands are not lost:

* the audit index, from this instance's JSONL log (idempotent, like the startup hydration);
* the in-flight records, from the audit: a command sent to an agent, with no result, timeout or
  ``machine_offline`` yet, and younger than the in-flight TTL, is in flight again, so its result
  still finds it, or the timeout sweep ends it later;
* the machine records of the agents connected to this process, rewritten from their sockets as a
  heartbeat would, so they are online at once rather than at their next heartbeat.

Domains that keep a full copy in memory (dual-written phases) are refilled by the store router
itself (``StoreRouter.redis_data_lost``). What nothing can put back: idempotency keys of domains
without a memory copy (``redis-primary``), rate-limit windows and locale hints (docs/failure-modes.md).

The audit hydration at startup needs the store; when it cannot be reached then, the relay starts
anyway and the same background thread hydrates once it answers.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from relay.lifecycle.agent_events import AgentEvents
from relay.lifecycle.context import LifecycleContext, Scope
from relay.stores.base import StoreError
from relay.stores.envelope import parse_iso_ms

log = logging.getLogger("relay.recovery")

#: Statuses after which a command is no longer waiting for its agent.
TERMINAL = ("machine_offline", "inflight_timeout")

#: Looks at the store for a data loss now (``True`` when one was noticed); raises ``StoreError``.
LossCheck = Callable[[], bool]


def is_terminal(status: str) -> bool:
    return status.startswith("agent_") or status in TERMINAL


@dataclass(frozen=True)
class Restored:
    """What one restore put back."""

    audit_events: int
    inflight: int
    machines: int


class StoreRecovery:
    """Restores after a data loss, and runs the deferred startup hydration, on one background thread."""

    def __init__(self, ctx: LifecycleContext, agent_events: AgentEvents, scope: Scope,
                 check_loss: Optional[LossCheck] = None, interval_s: float = 1.0) -> None:
        self.ctx = ctx
        self._agent_events = agent_events
        self._scope = scope
        self._check_loss = check_loss
        self._interval_s = interval_s
        self._restore_wanted = threading.Event()
        self._hydrate_wanted = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.restores = 0

    # -- triggers -------------------------------------------------------------------------------
    def data_lost(self) -> None:
        """The store lost its data: restore on the background thread (quick, callable from any thread)."""
        self._restore_wanted.set()
        self._wake.set()

    def hydrate_at_startup(self) -> int:
        """Replay the audit log into the index now; when the store cannot be reached, start anyway
        and let the background thread do it once it answers. Return the events added now."""
        try:
            return self.ctx.audit.hydrate(self._scope)
        except StoreError as exc:
            self._hydrate_wanted = True
            log.warning("audit hydration deferred until the store answers: %s", type(exc).__name__,
                        extra={"event": "audit_hydrate_deferred", "error": type(exc).__name__})
            return 0

    # -- work -----------------------------------------------------------------------------------
    def restore(self) -> Restored:
        """Put back the audit index, the in-flight records and this process's machine records."""
        events = self.ctx.audit.hydrate(self._scope)
        with self._scope():
            inflight = self._restore_inflight()
            machines = self._reregister_machines()
        restored = Restored(events, inflight, machines)
        self.restores += 1
        log.warning("state restored after a store data loss", extra={
            "event": "store_state_restored", "auditEvents": events, "inflight": inflight, "machines": machines})
        return restored

    def _restore_inflight(self) -> int:
        ctx = self.ctx
        oldest = ctx.clock() - ctx.settings.inflight_ttl_ms
        restored = 0
        for record in ctx.domains.audit.list_recent(ctx.settings.audit_max_records):
            if is_terminal(record["status"]) or not any(e["status"] == "sent_to_agent" for e in record["events"]):
                continue
            if not (record.get("userId") and record.get("machineId") and record.get("kind")):
                continue
            try:
                created_ms = parse_iso_ms(record["createdAt"])
            except ValueError:
                continue
            if created_ms < oldest or ctx.domains.inflight.get(record["commandId"]) is not None:
                continue
            ctx.domains.inflight.put({"commandId": record["commandId"], "userId": record["userId"],
                                      "machineId": record["machineId"], "kind": record["kind"],
                                      "createdAtMs": created_ms})
            restored += 1
        return restored

    def _reregister_machines(self) -> int:
        count = 0
        for machine_id in self.ctx.sessions.machine_ids():
            session = self.ctx.sessions.get(machine_id)
            if session is None:
                continue
            self._agent_events.on_heartbeat(session, {"type": "agent.heartbeat", "machineId": machine_id})
            count += 1
        return count

    # -- the thread -----------------------------------------------------------------------------
    def run_once(self) -> None:
        """One pass: look for a data loss, then do whatever is wanted while the store answers."""
        try:
            if self._check_loss is not None:
                self._check_loss()
            if self._hydrate_wanted:
                added = self.ctx.audit.hydrate(self._scope)
                self._hydrate_wanted = False
                log.info("audit log hydrated", extra={"event": "audit_hydrated", "events": added})
            if self._restore_wanted.is_set():
                self._restore_wanted.clear()
                try:
                    self.restore()
                except Exception:
                    self._restore_wanted.set()
                    raise
        except StoreError as exc:
            log.info("store recovery waits for the store: %s", type(exc).__name__,
                     extra={"event": "store_recovery_waiting", "error": type(exc).__name__})

    def start(self) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self._wake.wait(self._interval_s)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    self.run_once()
                except Exception as exc:  # noqa: BLE001 - the thread must outlive one bad pass
                    log.error("store recovery pass failed", extra={"event": "store_recovery_failed",
                                                                   "error": type(exc).__name__})

        self._thread = threading.Thread(target=loop, name="store-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
