"""What the agent channel needs from the rest of the relay, and what it offers."""
from __future__ import annotations

from typing import Any, Optional, Protocol


class AgentConnection(Protocol):
    """One connected agent socket, as the lifecycle sees it."""

    session_id: str
    #: Set by the first hello; ``None`` before it.
    machine_id: Optional[str]

    def send_json(self, frame: dict[str, Any]) -> bool:
        """Send a frame; ``False`` when the socket is closed, closing or the send failed."""

    def close(self, reason: str = "") -> None:
        """Close the socket (idempotent)."""


class AgentEventHandler(Protocol):
    """Implemented by the lifecycle; called by the channel once per frame.

    Each call runs inside its own store binding (one flags snapshot per frame).
    Exceptions are logged by the channel and the frame is dropped; the socket stays open.
    """

    def on_hello(self, conn: AgentConnection, frame: dict[str, Any]) -> None: ...

    def on_heartbeat(self, conn: AgentConnection, frame: dict[str, Any]) -> None: ...

    def on_result(self, conn: AgentConnection, frame: dict[str, Any]) -> None: ...

    def on_disconnect(self, conn: AgentConnection) -> None: ...
