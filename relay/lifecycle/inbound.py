"""The walk of one callback (reference §4.4-4.7): gates, classification, audit, dispatch, ack.

Deliberate change (reference §13 item 7): the msgId is released again when the
callback cannot be acknowledged with a 2xx, so WeCom's retry is processed
instead of being swallowed as a duplicate. The encrypted-reply configuration is
checked before any side effect, so a missing ``WECOM_CORP_ID`` no longer
dispatches a command that WeCom is then told failed.

Store round trips (Redis, ``redis-primary``): an accepted callback makes two
(``tests/test_round_trips.py``). The rate-limit hit and the msgId reservation go
together (nothing is reserved beyond the limit) with the locale and machine reads
prefetched; the template, the audit record (``created`` and ``sent_to_agent`` at
once) and the in-flight record are written together before the command is sent,
so the agent's answer always finds them. A send that fails turns the audit
record's ``sent_to_agent`` into ``machine_offline`` (``AuditIndex.retract``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from relay import dsl
from relay.lifecycle.context import LifecycleContext
from relay.lifecycle.dispatched import attachment
from relay.lifecycle.types import Ack, InboundMessage
from relay.messages import clip_for_trace, handshake_text

log = logging.getLogger("relay.lifecycle")

DEFAULT_LOCALE = "zh-CN"


def _error(status: int, code: str) -> Ack:
    return Ack(status, {"error": code})


class InboundPipeline:
    def __init__(self, ctx: LifecycleContext) -> None:
        self.ctx = ctx

    def handle(self, msg: InboundMessage) -> Ack:
        ctx = self.ctx
        settings = ctx.settings
        domains = ctx.domains
        if not (msg.msg_id and msg.user_id and msg.text):
            return _error(400, "invalid_payload")
        if msg.encrypted and msg.xml_mode and not (
            settings.wecom_token and settings.wecom_encoding_aes_key and settings.wecom_corp_id
        ):
            return _error(500, "missing_wecom_encrypted_reply_config")
        machine_id, refused = self._gates(msg.user_id, msg.machine_id)
        if refused is not None:
            # Refused by configuration: the hit still counts, and the rate limit answers first.
            return refused if domains.ratelimit.allow(msg.user_id) else _error(429, "rate_limited")
        assert machine_id is not None
        # One round trip: the rate-limit hit, the msgId reservation (only within the limit), and the
        # locale and machine records read along with them.
        domains.locale.prefetch(msg.user_id)
        domains.machines.prefetch(machine_id)
        allowed, reserved = domains.idempotency.reserve_within(msg.msg_id, ctx.clock(),
                                                               domains.ratelimit.hit(msg.user_id))
        if not allowed:
            return _error(429, "rate_limited")
        try:
            locale = domains.locale.get(msg.user_id) or DEFAULT_LOCALE
            if not reserved:
                ctx.trace(machine_id, "wecom->relay", "duplicate_ignored", machineId=machine_id,
                          userId=msg.user_id, status="duplicate_ignored")
                ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", machineId=machine_id,
                          userId=msg.user_id, status="duplicate_ignored")
                return Ack(200, {"status": "duplicate_ignored", "locale": locale})
            return self._accept(msg, msg.user_id, machine_id, msg.text, locale)
        except Exception:
            if reserved:
                domains.idempotency.release(msg.msg_id)
            raise

    def _gates(self, user_id: str, requested: Optional[str]) -> tuple[Optional[str], Optional[Ack]]:
        """The gates decided by configuration alone: allowlist and machine binding. Returns the
        machine the command is for, or the refusal."""
        settings = self.ctx.settings
        if user_id not in settings.allowlist:
            return None, _error(403, "user_not_allowed")
        bound = settings.machine_bindings.get(user_id)
        machine_id = requested or bound
        if not machine_id:
            return None, _error(400, "missing_machine_id")
        if bound and bound != machine_id:
            return None, _error(403, "machine_binding_mismatch")
        return machine_id, None

    def _accept(self, msg: InboundMessage, user_id: str, machine_id: str, text: str, locale: str) -> Ack:
        ctx = self.ctx
        parsed = dsl.parse_dev_command(text)
        task_prompt = dsl.natural_language_task_prompt(text)
        kind = dsl.wecom_kind(parsed)
        if kind == "task" and not task_prompt:
            ctx.trace(machine_id, "wecom->relay", "non_dev_message_ignored", machineId=machine_id, userId=user_id,
                      status="ignored_non_dev_message", detail=clip_for_trace(text, 120))
            ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", machineId=machine_id, userId=user_id,
                      status="ignored_non_dev_message")
            return Ack(200, {"status": "ignored_non_dev_message", "locale": locale})

        command = self._envelope(parsed, task_prompt, kind, user_id, machine_id)
        command_id = command["commandId"]
        fields_ = {"commandId": command_id, "machineId": machine_id, "userId": user_id, "kind": kind}
        ctx.trace(machine_id, "wecom->relay", "command_received", detail=clip_for_trace(text, 140), **fields_)
        ctx.domains.templates.put(command, ctx.clock())
        created = ctx.event(command_id, "created", command["createdAt"], userId=user_id, machineId=machine_id,
                            kind=kind, summary=text)

        record = ctx.online_record(machine_id)
        if record is not None:
            sent = ctx.event(command_id, "sent_to_agent", userId=user_id, machineId=machine_id, kind=kind)
            if self._dispatch(command, record, created, sent):
                ctx.trace(machine_id, "relay->agent", "command_dispatched", status="sent_to_agent", **fields_)
                ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", status="sent_to_agent", **fields_)
                return Ack(200, {"status": "sent_to_agent", "commandId": command_id,
                                 "passiveMessage": handshake_text(kind, locale), "locale": locale})
        else:
            offline = ctx.event(command_id, "machine_offline", userId=user_id, machineId=machine_id)
            ctx.audit.index.open([created, offline], flush=True)
            ctx.audit.log([created, offline])
        ctx.trace(machine_id, "relay->agent", "command_dispatch_failed", status="machine_offline", **fields_)
        ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", status="machine_offline", **fields_)
        return Ack(200, {"status": "machine_offline", "machineId": machine_id, "commandId": command_id,
                         "locale": locale})

    def _envelope(self, parsed: Optional[dict[str, Any]], task_prompt: Optional[str], kind: str,
                  user_id: str, machine_id: str) -> dict[str, Any]:
        ctx = self.ctx
        command: dict[str, Any] = {"commandId": ctx.new_id(), "machineId": machine_id, "userId": user_id, "kind": kind}
        prompt = task_prompt if kind == "task" else (parsed or {}).get("prompt")
        if prompt:
            command["prompt"] = prompt
        ref_id = (parsed or {}).get("refId")
        if ref_id:
            command["refId"] = ref_id
        command["createdAt"] = ctx.now_iso()
        return command

    def _dispatch(self, command: dict[str, Any], record: dict[str, Any], created: dict[str, Any],
                  sent: dict[str, Any]) -> bool:
        """Audit the command as created and sent and track it in flight, in one round trip with the
        template (``InflightCommands.put`` flushes the unit of work); then send it, here or through
        the process holding the machine. When the socket refuses or the holder does not confirm, the
        command is untracked and its audit record says ``machine_offline`` instead of sent."""
        ctx = self.ctx
        command_id = command["commandId"]
        opened = ctx.audit.index.open([created, sent])
        tracked = ctx.domains.inflight.put({"commandId": command_id, "userId": command["userId"],
                                            "machineId": command["machineId"], "kind": command["kind"],
                                            "createdAtMs": ctx.clock()})
        ctx.audit.log([created])
        # Kept by the process holding the agent, which handles its answer: here before the send (the
        # answer may be handled before ``send`` returns), or by the holder when the bus delivers it.
        attached = None
        if ctx.held_here(record):
            ctx.dispatched.remember(command_id, opened, tracked)
        else:
            attached = attachment(command_id, opened, tracked)
        if ctx.send(command["machineId"], {"type": "command", "command": command}, record, attached):
            ctx.audit.log([sent])
            return True
        ctx.dispatched.forget(command_id)
        ctx.domains.inflight.remove(command_id)
        offline = ctx.event(command_id, "machine_offline", userId=command["userId"],
                            machineId=command["machineId"])
        if ctx.audit.index.retract(opened.data, sent, offline):
            ctx.audit.log([offline])
        return False
