"""Admin actions on commands: cancel and retry (reference §2.8, §2.9, §7).

Both reach the machine wherever its socket is held: on this process, or through the bus to the
process holding it, which confirms the send (``LifecycleContext.send``).
"""
from __future__ import annotations

from typing import Any, Optional

from relay.lifecycle.context import LifecycleContext

Reply = tuple[int, dict[str, Any]]


class CommandActions:
    def __init__(self, ctx: LifecycleContext) -> None:
        self.ctx = ctx

    def cancel(self, command_id: str, user_id: Optional[str]) -> Reply:
        ctx = self.ctx
        owner = ctx.domains.inflight.get(command_id)
        if owner is None:
            return 404, {"error": "command_not_inflight"}
        if user_id and user_id != owner["userId"]:
            return 403, {"error": "cancel_not_authorized"}
        machine_id = owner["machineId"]
        frame = {"type": "command.cancel", "commandId": command_id, "requestedAt": ctx.now_iso()}
        record = ctx.online_record(machine_id)
        if record is None or not ctx.send(machine_id, frame, record):
            ctx.audit.record(ctx.event(command_id, "cancel_failed_machine_offline", userId=owner["userId"],
                                       machineId=machine_id))
            return 409, {"error": "machine_offline"}
        ctx.audit.record(ctx.event(command_id, "cancel_sent", userId=owner["userId"], machineId=machine_id))
        return 200, {"status": "cancel_sent", "commandId": command_id}

    def retry(self, command_id: str, user_id: Optional[str]) -> Reply:
        ctx = self.ctx
        template = ctx.domains.templates.get(command_id)
        if template is None:
            return 404, {"error": "command_not_found_for_retry"}
        if user_id and user_id != template["userId"]:
            return 403, {"error": "retry_not_authorized"}
        machine_id = template["machineId"]
        record = ctx.online_record(machine_id)
        if record is None:
            return 409, {"error": "machine_offline"}
        command = dict(template, commandId=ctx.new_id(), createdAt=ctx.now_iso())
        new_id = command["commandId"]
        ctx.domains.inflight.put({"commandId": new_id, "userId": command["userId"], "machineId": machine_id,
                                  "kind": command["kind"], "createdAtMs": ctx.clock()})
        if not ctx.send(machine_id, {"type": "command", "command": command}, record):
            ctx.domains.inflight.remove(new_id)
            return 409, {"error": "machine_offline"}
        ctx.domains.templates.put(command, ctx.clock())
        ctx.audit.record(ctx.event(new_id, "retried_created", command["createdAt"], userId=command["userId"],
                                   machineId=machine_id, kind=command["kind"], metadata={"retriedFrom": command_id}))
        ctx.audit.record(ctx.event(new_id, "sent_to_agent", userId=command["userId"], machineId=machine_id,
                                   kind=command["kind"]))
        return 200, {"status": "retried_sent", "commandId": new_id, "retriedFrom": command_id}
