"""Values passed between the HTTP layer and the command lifecycle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class InboundMessage:
    """A normalized WeCom callback (reference §4.1-4.3), before any gate runs."""

    msg_id: Optional[str] = None
    user_id: Optional[str] = None
    machine_id: Optional[str] = None
    text: Optional[str] = None
    #: Reply target for passive XML: inbound FromUserName / ToUserName.
    reply_to: Optional[str] = None
    reply_from: Optional[str] = None
    #: The ack must be a passive XML reply (plain or encrypted).
    xml_mode: bool = False
    #: The request carried an encrypted envelope (the ack is encrypted too).
    encrypted: bool = False


@dataclass
class Ack:
    """The lifecycle's answer to a callback: an HTTP status and a JSON payload.

    For status 200 the payload is one of the four ack shapes of reference §4.8
    (``status`` is sent_to_agent, machine_offline, duplicate_ignored or
    ignored_non_dev_message); the HTTP layer turns it into JSON, passive XML,
    ``success`` or an encrypted reply. Other statuses carry ``{"error": ...}``.
    """

    http_status: int
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.http_status == 200
