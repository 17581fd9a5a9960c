"""Periodic work: the in-flight timeout sweep, template clean-up and stale machines (reference §7.2),
and the audit records' value indexes (``AuditIndex.link``, also every ``LINK_INTERVAL_S`` between
periods).

Every process closes its own stale sockets each period. The sweeps of shared state (in-flight
timeouts, template clean-up, machine records of processes that are gone, linking the audit records
updated since the last pass) run only in the process holding the leader lease, so across all
instances and workers they run once per period and each timeout is audited and notified once
(reference §7.2, §13 item 22).
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Optional

from relay.lifecycle.context import LifecycleContext
from relay.lifecycle.leader import LeaderLease
from relay.lifecycle.notify import ResultNotifier

log = logging.getLogger("relay.sweeps")

#: How often the leader links the audit records between two periods (``AuditIndex.link``): a filtered
#: ``/audit/recent`` reads every record written since the last link.
LINK_INTERVAL_S = 5.0


def _run(step: Callable[[], Any]) -> None:
    """One step of a period: a failure is logged, and the other steps still run."""
    try:
        step()
    except Exception as exc:
        log.error("sweep step failed", extra={"event": "sweep_failed", "error": type(exc).__name__})


class Sweeper:
    def __init__(self, ctx: LifecycleContext, notifier: ResultNotifier,
                 scope: Callable[[], AbstractContextManager[Any]], lease: Optional[LeaderLease] = None) -> None:
        """Without ``lease`` this process always leads (one process, tests)."""
        self.ctx = ctx
        self.notifier = notifier
        self.lease = lease
        self._scope = scope
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep_inflight(self) -> list[str]:
        """End commands that waited longer than the in-flight timeout; return their ids.

        The timeout is audited before the record is claimed, so a leader killed in between leaves the
        command in flight for the next leader rather than lost. A command whose answer is audited
        already (its handler stopped before claiming it) is released without a timeout.
        """
        ctx = self.ctx
        now = ctx.clock()
        timed_out = []
        for record in ctx.domains.inflight.list(older_than_ms=now - ctx.settings.inflight_command_timeout_ms):
            command_id = record["commandId"]
            audited = ctx.domains.audit.get(command_id)
            if audited is not None and audited["status"].startswith("agent_"):
                ctx.domains.inflight.claim(command_id)
                continue
            summary = f"command {command_id} timed out while waiting for agent result"
            ctx.audit.record(ctx.event(command_id, "inflight_timeout", userId=record["userId"],
                                       machineId=record["machineId"], kind=record["kind"]))
            if ctx.domains.inflight.claim(command_id) is None:
                continue
            timed_out.append(command_id)
            ctx.trace(record["machineId"], "relay->agent", "command_timeout_discarded", commandId=command_id,
                      machineId=record["machineId"], userId=record["userId"], kind=record["kind"],
                      status="inflight_timeout", detail=summary)
            self.notifier.notify(record["userId"], summary, "error", command_id=command_id,
                                 machine_id=record["machineId"], kind=record["kind"])
        return timed_out

    def sweep_stale_sessions(self) -> list[str]:
        """Close local sockets whose machine record is missing, stale or now another session's.

        A socket that said hello within the last period is left alone: its record may not be written yet.
        """
        ctx = self.ctx
        now = ctx.clock()
        grace = ctx.settings.sweep_interval_ms
        closed = []
        for machine_id in ctx.sessions.machine_ids():
            session = ctx.sessions.get(machine_id)
            if session is None or now - getattr(session, "connected_at_ms", now) < grace:
                continue
            record = ctx.domains.machines.get(machine_id)
            if (record is not None and not ctx.domains.machines.is_stale(record, now)
                    and record["sessionId"] == session.session_id):
                continue
            session.close("stale")
            closed.append(machine_id)
        return closed

    def sweep_orphaned_machines(self) -> list[str]:
        """Remove machine records held by processes that are gone (their bus listener is not subscribed).

        Their sockets died with them; the agents reconnect to a live process, which writes a new record.
        Skipped while this process's own bus is down. A holder only cut off from Redis for a moment gets
        its record back with its agent's next heartbeat.
        """
        ctx = self.ctx
        if ctx.bus is None or not ctx.bus.connected:
            return []
        records = ctx.domains.machines.list()
        holders = {r["holder"] for r in records if r.get("holder") and r["holder"] != ctx.instance_id}
        if not holders:
            return []
        gone = holders - ctx.bus.live_instances(holders)
        removed = [r["machineId"] for r in records
                   if r.get("holder") in gone and ctx.domains.machines.remove(r["machineId"], r["sessionId"])]
        if removed:
            log.info("removed %d machine record(s) of gone relay processes", len(removed),
                     extra={"event": "orphaned_machines_removed", "count": len(removed)})
        return removed

    def run_once(self) -> bool:
        """One period; return whether this process led it (ran the shared sweeps)."""
        ctx = self.ctx
        with self._scope():
            leading = self.lease is None or self.lease.hold()
            steps: list[Callable[[], Any]] = [self.sweep_stale_sessions]
            if leading:
                steps = [self.sweep_inflight, self.sweep_orphaned_machines, self.sweep_stale_sessions,
                         lambda: ctx.domains.templates.sweep(ctx.clock()),
                         lambda: ctx.domains.audit.link(ctx.clock())]
            for step in steps:
                _run(step)
        return leading

    def link_audit(self) -> None:
        """Between periods, the leader of the last one links the audit records written since."""
        if self.lease is not None and not self.lease.held:
            return
        ctx = self.ctx
        with self._scope():
            _run(lambda: ctx.domains.audit.link(ctx.clock()))

    def start(self) -> None:
        if self._thread is not None:
            return
        interval = self.ctx.settings.sweep_interval_ms / 1000
        # Wake ``ticks`` times a period, at most ``LINK_INTERVAL_S`` apart: the last wake sweeps.
        ticks = max(1, math.ceil(interval / LINK_INTERVAL_S))

        def loop() -> None:
            woken = 0
            while not self._stop.wait(interval / ticks):
                woken += 1
                if woken % ticks == 0:
                    self.run_once()
                else:
                    self.link_audit()

        self._thread = threading.Thread(target=loop, name="sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and give the lease up, so another process takes the sweeps over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.lease is not None:
            with self._scope():
                self.lease.release()
