"""The walk of one callback (reference §4.4-4.7): gates, classification, audit, dispatch, ack.

Deliberate change (reference §13 item 7): the msgId is released again when the
callback cannot be acknowledged with a 2xx, so WeCom's retry is processed
instead of being swallowed as a duplicate. The encrypted-reply configuration is
checked before any side effect, so a missing ``WECOM_CORP_ID`` no longer
dispatches a command that WeCom is then told failed.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from relay import dsl
from relay.lifecycle.context import LifecycleContext
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
        if not (msg.msg_id and msg.user_id and msg.text):
            return _error(400, "invalid_payload")
        if msg.encrypted and msg.xml_mode and not (
            settings.wecom_token and settings.wecom_encoding_aes_key and settings.wecom_corp_id
        ):
            return _error(500, "missing_wecom_encrypted_reply_config")
        if not ctx.domains.ratelimit.allow(msg.user_id):
            return _error(429, "rate_limited")
        if msg.user_id not in settings.allowlist:
            return _error(403, "user_not_allowed")
        bound = settings.machine_bindings.get(msg.user_id)
        machine_id = msg.machine_id or bound
        if not machine_id:
            return _error(400, "missing_machine_id")
        if bound and bound != machine_id:
            return _error(403, "machine_binding_mismatch")
        locale = ctx.domains.locale.get(msg.user_id) or DEFAULT_LOCALE

        if not ctx.domains.idempotency.reserve(msg.msg_id, ctx.clock()):
            ctx.trace(machine_id, "wecom->relay", "duplicate_ignored", machineId=machine_id,
                      userId=msg.user_id, status="duplicate_ignored")
            ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", machineId=machine_id,
                      userId=msg.user_id, status="duplicate_ignored")
            return Ack(200, {"status": "duplicate_ignored", "locale": locale})
        try:
            return self._accept(msg, msg.user_id, machine_id, msg.text, locale)
        except Exception:
            ctx.domains.idempotency.release(msg.msg_id)
            raise

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
        ctx.audit.record(ctx.event(command_id, "created", command["createdAt"], userId=user_id,
                                   machineId=machine_id, kind=kind, summary=text))

        record = ctx.online_record(machine_id)
        if record is None or not self._dispatch(command, record):
            ctx.audit.record(ctx.event(command_id, "machine_offline", userId=user_id, machineId=machine_id))
            ctx.trace(machine_id, "relay->agent", "command_dispatch_failed", status="machine_offline", **fields_)
            ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", status="machine_offline", **fields_)
            return Ack(200, {"status": "machine_offline", "machineId": machine_id, "commandId": command_id,
                             "locale": locale})

        ctx.trace(machine_id, "relay->agent", "command_dispatched", status="sent_to_agent", **fields_)
        ctx.audit.record(ctx.event(command_id, "sent_to_agent", userId=user_id, machineId=machine_id, kind=kind))
        ctx.trace(machine_id, "relay->wecom", "passive_ack_sent", status="sent_to_agent", **fields_)
        return Ack(200, {"status": "sent_to_agent", "commandId": command_id,
                         "passiveMessage": handshake_text(kind, locale), "locale": locale})

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

    def _dispatch(self, command: dict[str, Any], record: dict[str, Any]) -> bool:
        """Track the command in flight, then send it (here or through the process holding the machine);
        untrack it when the socket refuses or the holder does not confirm."""
        ctx = self.ctx
        ctx.domains.inflight.put({"commandId": command["commandId"], "userId": command["userId"],
                                  "machineId": command["machineId"], "kind": command["kind"],
                                  "createdAtMs": ctx.clock()})
        if ctx.send(command["machineId"], {"type": "command", "command": command}, record):
            return True
        ctx.domains.inflight.remove(command["commandId"])
        return False
