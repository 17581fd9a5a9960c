"""The command pipeline: gates, classification, audit, dispatch, results, admin actions, sweeps."""
from __future__ import annotations

from typing import Any, Optional

from relay.lifecycle.commands import CommandActions
from relay.lifecycle.inbound import InboundPipeline
from relay.lifecycle.types import Ack, InboundMessage


class Lifecycle:
    """What the HTTP routes call; the agent channel talks to ``AgentEvents`` instead."""

    def __init__(self, inbound: InboundPipeline, actions: CommandActions) -> None:
        self._inbound = inbound
        self._actions = actions

    def handle_inbound(self, msg: InboundMessage) -> Ack:
        return self._inbound.handle(msg)

    def cancel(self, command_id: str, user_id: Optional[str]) -> tuple[int, dict[str, Any]]:
        return self._actions.cancel(command_id, user_id)

    def retry(self, command_id: str, user_id: Optional[str]) -> tuple[int, dict[str, Any]]:
        return self._actions.retry(command_id, user_id)
