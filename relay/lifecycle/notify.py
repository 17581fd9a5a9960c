"""Pushing results to users (reference §6.2): the WeCom API first, then the webhook.

Pushes run on a small pool off the agent's socket thread, each inside its own
store binding, so a slow WeCom API never stalls an agent's frames. With neither
configured there is nothing to wait for: the ``result_ready_no_push`` trace is
sent at once, in the caller's frame scope, and joins the socket's held frames.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

from relay.lifecycle.context import LifecycleContext
from relay.messages import (
    analyze_push_failure,
    clip_for_trace,
    format_fallback_result_message,
    format_result_message,
)

log = logging.getLogger("relay.notify")


#: ``(user_id, content)``: deliver a WeCom text message; raise with the API's error text on failure.
TextPusher = Callable[[str, str], Any]
#: ``(user_id, status, summary)``: POST the result webhook; raise on a network error or a non-2xx answer.
ResultPoster = Callable[[str, str, str], Any]


class ResultNotifier:
    def __init__(
        self,
        ctx: LifecycleContext,
        scope: Callable[[], AbstractContextManager[Any]],
        wecom: Optional[TextPusher],
        webhook: Optional[ResultPoster],
        workers: int = 4,
    ) -> None:
        self.ctx = ctx
        self._scope = scope
        self.wecom = wecom
        self.webhook = webhook
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="notify")
        #: What ``notify`` returns for a push it carried out at once: one future, completed once.
        self._pushed: Future[None] = Future()
        self._pushed.set_result(None)

    def notify(self, user_id: str, summary: str, status: str, *, command_id: Optional[str],
               machine_id: str, kind: Optional[str]) -> Future[None]:
        if self.wecom is not None or self.webhook is not None:
            return self._pool.submit(self._run, self._scope, user_id, summary, status, command_id, machine_id, kind)
        self._run(nullcontext, user_id, summary, status, command_id, machine_id, kind)
        return self._pushed

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)

    def _run(self, scope: Callable[[], AbstractContextManager[Any]], user_id: str, summary: str, status: str,
             command_id: Optional[str], machine_id: str, kind: Optional[str]) -> None:
        try:
            with scope():
                self.push(user_id, summary, status, command_id=command_id, machine_id=machine_id, kind=kind)
        except Exception as exc:  # neither the pool nor the agent's frame handler may swallow it silently
            log.error("result push crashed", extra={"event": "result_push_crashed", "error": type(exc).__name__})

    def push(self, user_id: str, summary: str, status: str, *, command_id: Optional[str],
             machine_id: str, kind: Optional[str]) -> None:
        ctx = self.ctx
        trace = dict(commandId=command_id, machineId=machine_id, userId=user_id, kind=kind, status=status)
        if self.wecom is not None:
            options = dict(command_id=command_id, kind=kind, machine_id=machine_id)
            try:
                self.wecom(user_id, format_result_message(status, summary, **options))
                ctx.trace(machine_id, "relay->wecom", "result_push_ok", detail=clip_for_trace(summary, 180), **trace)
                return
            except Exception as primary_exc:
                primary = analyze_push_failure(str(primary_exc))
            try:
                self.wecom(user_id, format_fallback_result_message(status, summary, **options))
            except Exception as fallback_exc:
                fallback = analyze_push_failure(str(fallback_exc))
                log.error("result push failed", extra={"event": "result_push_failed"})
                if command_id:
                    self._audit(command_id, "result_push_failed", user_id, machine_id,
                                f"{primary.detail}; fallback={fallback.detail}",
                                {"primaryWecomErrorCode": primary.code or "unknown",
                                 "fallbackWecomErrorCode": fallback.code or "unknown",
                                 "outboundIp": fallback.outbound_ip or primary.outbound_ip or "unknown"})
                ctx.trace(machine_id, "relay->wecom", "result_push_failed", **trace)
            else:
                log.warning("result pushed with the fallback message", extra={"event": "result_push_fallback"})
                ctx.trace(machine_id, "relay->wecom", "result_push_ok", detail=f"fallback_used: {primary.detail}",
                          **trace)
                if command_id:
                    self._audit(command_id, "result_push_fallback_ok", user_id, machine_id, primary.detail,
                                {"wecomErrorCode": primary.code or "unknown",
                                 "outboundIp": primary.outbound_ip or "unknown"})
                return
        if self.webhook is None:
            log.info("result ready, no push configured", extra={"event": "result_ready_no_push"})
            ctx.trace(machine_id, "relay->wecom", "result_ready_no_push", **trace)
            return
        try:
            self.webhook(user_id, status, summary)
            ctx.trace(machine_id, "relay->wecom", "result_webhook_ok", **trace)
        except Exception as exc:
            ctx.trace(machine_id, "relay->wecom", "result_webhook_failed", detail=clip_for_trace(str(exc), 180),
                      **trace)

    def _audit(self, command_id: str, status: str, user_id: str, machine_id: str, summary: str,
               metadata: dict[str, str]) -> None:
        try:
            self.ctx.audit.record(self.ctx.event(command_id, status, userId=user_id, machineId=machine_id,
                                                 summary=summary, metadata=metadata))
        except Exception as exc:
            log.error("push audit failed", extra={"event": "audit_write_failed", "error": type(exc).__name__})
