"""What this process wrote for the commands it dispatched, kept until their results come.

An agent usually answers the process that sent it the command, and that process knows the audit
record and the in-flight record as it wrote them. A result can then be written over them without
reading them first (``AgentEvents.handle_result``): the write is a compare-and-set, so when anyone
wrote either record since, nothing is written or claimed and the result is handled again from a
read. Whatever was decided from the known records was decided on exactly what the write found.

Process-local and bounded: past ``limit`` entries the oldest go first (commands never answered, or
answered by another process). Losing an entry costs a read, never a result.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from relay.locks import compute_lock
from relay.stores.envelope import Entry

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
