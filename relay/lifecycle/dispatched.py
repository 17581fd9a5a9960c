"""What this process wrote for the commands it dispatched, kept until their results come.

An agent usually answers the process that sent it the command, and that process knows the audit
record and the in-flight record as it wrote them. A result can then be written over them without
reading them first (``AgentEvents.handle_result``): the write is a compare-and-set, so when anyone
wrote either record since, nothing is written or claimed and the result is handled again from a
read. Whatever was decided from the known records was decided on exactly what the write found.

A command dispatched through the bus to the process holding the agent carries its records as
written (``attachment``), and that process keeps them as if it had written them
(``KeptFromSender``, the bus's delivery listener): the agent answers its holder, which then
writes over them just the same.

Process-local and bounded: past ``limit`` entries the oldest go first (commands never answered, or
answered by another process). Losing an entry costs a read, never a result.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from relay.domains import audit, inflight
from relay.locks import compute_lock
from relay.stores.envelope import Entry, EnvelopeError

DEFAULT_LIMIT = 4096


@dataclass(frozen=True)
class Dispatched:
    """A dispatched command's records as this process wrote them."""

    audit: Entry
    inflight: Entry


class DispatchedCommands:
    """Entries by command id, oldest first, at most ``limit``."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._entries: OrderedDict[str, Dispatched] = OrderedDict()
        self._lock = compute_lock()

    def remember(self, command_id: str, audit: Entry, inflight: Entry) -> None:
        with self._lock:
            self._entries[command_id] = Dispatched(audit, inflight)
            if len(self._entries) > self.limit:
                self._entries.popitem(last=False)

    def take(self, command_id: str) -> Optional[Dispatched]:
        """The command's entry, now forgotten: a result uses it once."""
        with self._lock:
            return self._entries.pop(command_id, None)

    def forget(self, command_id: str) -> None:
        with self._lock:
            self._entries.pop(command_id, None)

    def __len__(self) -> int:
        return len(self._entries)


def attachment(command_id: str, audit_entry: Entry, inflight_entry: Entry) -> dict[str, str]:
    """What a command sent through the bus carries for its holder: both records as stored."""
    return {"commandId": command_id, "audit": audit_entry.raw, "inflight": inflight_entry.raw}


def _from_attachment(attached: Any) -> Optional[tuple[str, Dispatched]]:
    """The command id and records ``attachment`` gave; ``None`` for anything else."""
    if not isinstance(attached, dict):
        return None
    command_id, audit_raw, inflight_raw = attached.get("commandId"), attached.get("audit"), attached.get("inflight")
    if not (isinstance(command_id, str) and isinstance(audit_raw, str) and isinstance(inflight_raw, str)):
        return None
    try:
        return command_id, Dispatched(audit.DOMAIN.schema.decode(audit_raw),
                                      inflight.DOMAIN.schema.decode(inflight_raw))
    except EnvelopeError:
        return None


class KeptFromSender:
    """The bus's ``DeliveryListener`` on the process holding an agent: the records a command's sender
    attached are kept before the command goes to the agent, and forgotten if it could not be sent.
    Whatever they say, a result only writes over them where they are still what is stored."""

    def __init__(self, dispatched: DispatchedCommands) -> None:
        self.dispatched = dispatched

    def before_send(self, machine_id: str, frame: dict[str, Any], attached: Any) -> None:
        kept = _from_attachment(attached)
        if kept is not None:
            self.dispatched.remember(kept[0], kept[1].audit, kept[1].inflight)

    def send_failed(self, machine_id: str, frame: dict[str, Any], attached: Any) -> None:
        command_id = attached.get("commandId") if isinstance(attached, dict) else None
        if isinstance(command_id, str):
            self.dispatched.forget(command_id)
