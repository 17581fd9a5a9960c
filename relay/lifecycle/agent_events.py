"""Frames from agents: hello, heartbeat, result (reference §3.2, §6.1), and disconnects.

Deliberate changes: a socket speaks only for the machine it said hello as
(heartbeats and results naming another machine, and results for a command
sent to another machine, are dropped, §13 item 15); a
result is owned by exactly one handler even when two arrive at once (the
in-flight record is claimed atomically). A disconnect leaves the machine's
in-flight commands in flight: the agent may still answer after reconnecting
(to any relay process), and otherwise the timeout sweep ends them as
``inflight_timeout``, audited and notified, so none is lost silently.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from relay.agents.protocol import AgentConnection
from relay.lifecycle.context import LifecycleContext
from relay.lifecycle.dispatched import Dispatched
from relay.lifecycle.notify import ResultNotifier
from relay.messages import clip_for_trace, infer_locale, resolve_machine_notify_user

log = logging.getLogger("relay.lifecycle")

KNOWN_KINDS = {"help", "status", "plan", "patch", "apply", "test", "task"}
RECENT_FOR_NOTIFY = 100


def _count(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class AgentEvents:
    """Implements ``relay.agents.protocol.AgentEventHandler``."""

    def __init__(self, ctx: LifecycleContext, notifier: ResultNotifier) -> None:
        self.ctx = ctx
        self.notifier = notifier

    # -- hello / heartbeat / disconnect ---------------------------------------------------------
    def on_hello(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        machine_id = frame.get("machineId")
        if not isinstance(machine_id, str) or not machine_id.strip():
            log.warning("agent hello without a machineId ignored", extra={"event": "agent_hello_invalid"})
            return
        ctx = self.ctx
        previous = conn.machine_id
        if previous and previous != machine_id:
            ctx.sessions.detach(previous, conn.session_id)
            ctx.domains.machines.remove(previous, conn.session_id)
        conn.machine_id = machine_id
        now = ctx.clock()
        conn.connected_at_ms = now  # type: ignore[attr-defined]
        ctx.sessions.attach(machine_id, conn)
        ctx.domains.machines.register(self._record(conn, now, 0, 0))
        ctx.trace(machine_id, "relay->agent", "agent_connected", machineId=machine_id)

    def on_heartbeat(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        machine_id = conn.machine_id
        if machine_id is None or frame.get("machineId") != machine_id:
            return
        current = self.ctx.domains.machines.get(machine_id)
        running = _count(frame.get("runningCount"))
        pending = _count(frame.get("pendingCount"))
        if running is None:
            running = current["runningCount"] if current else 0
        if pending is None:
            pending = current["pendingCount"] if current else 0
        self.ctx.domains.machines.heartbeat(self._record(conn, self.ctx.clock(), running, pending))

    def on_disconnect(self, conn: AgentConnection) -> None:
        machine_id = conn.machine_id
        if machine_id is None:
            return
        ctx = self.ctx
        ctx.sessions.detach(machine_id, conn.session_id)
        ctx.domains.machines.remove(machine_id, conn.session_id)

    def _record(self, conn: AgentConnection, now: int, running: int, pending: int) -> dict[str, Any]:
        return {
            "machineId": conn.machine_id,
            "connectedAt": getattr(conn, "connected_at_ms", now),
            "lastHeartbeatAt": now,
            "runningCount": running,
            "pendingCount": pending,
            "sessionId": conn.session_id,
            "holder": self.ctx.instance_id,
        }

    # -- results --------------------------------------------------------------------------------
    def on_result(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        result = frame.get("result")
        if not isinstance(result, dict):
            return
        command_id, status, summary = result.get("commandId"), result.get("status"), result.get("summary")
        if not (isinstance(command_id, str) and command_id and isinstance(status, str) and status
                and isinstance(summary, str)):
            log.warning("agent result with missing fields ignored", extra={"event": "agent_result_invalid"})
            return
        machine_id = conn.machine_id
        if machine_id is None or result.get("machineId") != machine_id:
            log.warning("agent result for another machine ignored", extra={"event": "agent_result_spoofed"})
            return
        self.handle_result(command_id, machine_id, status, summary)

    def handle_result(self, command_id: str, machine_id: str, status: str, summary: str) -> None:
        """Audit the answer, claim the in-flight record and notify the user. When this process
        dispatched the command it knows both records as it wrote them and writes over them without a
        read; if either changed since, that write does nothing and the answer is handled again from
        a read, so every decision below is taken on what the write found."""
        ctx = self.ctx
        known = ctx.dispatched.take(command_id)
        if known is None:
            self._prefetch(command_id)  # before the trace, whose lookup of a remote holder carries them
        ctx.trace(machine_id, "agent->relay", "result_received", commandId=command_id, machineId=machine_id,
                  status=status, detail=clip_for_trace(summary, 180))
        if known is not None:
            if self._settle(command_id, machine_id, status, summary, known):
                return
            self._prefetch(command_id)
        self._settle(command_id, machine_id, status, summary, None)

    def _prefetch(self, command_id: str) -> None:
        """Both records a result reads, in one round trip."""
        self.ctx.domains.inflight.prefetch(command_id)
        self.ctx.domains.audit.prefetch(command_id)

    def _settle(self, command_id: str, machine_id: str, status: str, summary: str,
                known: Optional[Dispatched]) -> bool:
        """``handle_result`` on the records as read, or as ``known``; ``False`` when the known records
        had changed (nothing was recorded, claimed or sent)."""
        ctx = self.ctx
        domains = ctx.domains
        if known is None:
            claimable = domains.inflight.answered(command_id)
            record = domains.audit.get(command_id)
        else:
            claimable = domains.inflight.answered(command_id, known.inflight)
            record = known.audit.data
        owner = None if claimable is None else claimable.entry.data
        if any(found is not None and found.get("machineId") not in (None, machine_id) for found in (owner, record)):
            log.warning("agent result for another machine's command ignored", extra={"event": "agent_result_spoofed"})
            return True
        tag = "agent_" + status
        differs = (record is None or record.get("summary") != summary or record.get("status") != tag
                   or not record.get("userId"))
        user_id = (owner or {}).get("userId") or (record or {}).get("userId")
        notify_user = user_id
        if not notify_user and differs:
            recent = domains.audit.list_recent(RECENT_FOR_NOTIFY, machine_id=machine_id)
            notify_user = resolve_machine_notify_user(
                ctx.settings.machine_bindings, machine_id, [r.get("userId") for r in recent])
        kind = (owner or {}).get("kind") or (record or {}).get("kind")
        notify_kind = kind if kind in KNOWN_KINDS else None

        locale = infer_locale(summary)
        if locale:
            domains.locale.remember([(owner or {}).get("userId"), (record or {}).get("userId"), notify_user], locale)

        # Audited before the in-flight record is claimed (in one script where the stores allow): a process
        # killed in between leaves an answered command still in flight (the timeout sweep then releases it
        # quietly), never a lost one.
        event = ctx.event(command_id, tag, userId=user_id or notify_user, machineId=machine_id, kind=kind,
                          summary=summary)
        if known is not None:
            claimed = ctx.audit.record_over_known_then_claim(event, known.audit, claimable)
            if claimed is None:
                return False
            owned = claimed
        elif claimable is None:
            ctx.audit.record(event)
            owned = False
        else:
            owned = ctx.audit.record_then_claim(event, claimable)
        changed = owned or differs
        if notify_user and changed:
            self.notifier.notify(notify_user, summary, status, command_id=command_id, machine_id=machine_id,
                                 kind=notify_kind)
        return True
