"""What the routed store reports, and to whom: the one seam metrics and logs hang on."""
from __future__ import annotations

from collections import deque
from typing import Optional, Protocol, TypeVar

T = TypeVar("T")

#: Outcomes of one backend call.
OK, ERROR, TIMEOUT, REJECTED = "ok", "error", "timeout", "rejected"
#: Shadow comparison outcomes.
MATCH, MISSING, EXTRA, DIFFERENT, SHADOW_ERROR, SKIPPED = "match", "missing", "extra", "different", "error", "skipped"


def drain(queue: deque[T]) -> list[T]:
    """What ``queue`` holds now, taken out. Observers and counters queue events with
    ``deque.append`` (no lock) and count them later; events appended meanwhile wait for the next
    drain. Only one caller may drain a queue at a time (each holds its own lock)."""
    return [queue.popleft() for _ in range(len(queue))]


class StoreObserver(Protocol):
    def operation(self, domain: str, backend: str, op: str, outcome: str, seconds: float) -> None:
        """One call to one backend (outcome: ok, error, timeout, rejected by an open breaker)."""

    def fallback(self, domain: str, op: str, kind: str) -> None:
        """A read or write served by memory because Redis failed (kind: "read" or "write")."""

    def refused(self, domain: str, backend: str, op: str, kind: str, seconds: float, mirror_skipped: bool) -> None:
        """``backend``'s open breaker refused ``op`` and memory served it in ``seconds`` (kind: "read" or
        "write"); ``mirror_skipped`` when a mirror write was skipped with it. One report for what
        counts as four: a call of ``backend`` rejected, a fallback, a memory call that succeeded, and
        the skipped mirror write. During an outage every store call is one of these."""

    def secondary_failure(self, domain: str, op: str) -> None:
        """A mirrored write to the non-authoritative backend failed (the request went on)."""

    def secondary_skipped(self, domain: str, op: str) -> None:
        """The authoritative write failed, so the mirror write was not attempted."""

    def shadow(self, domain: str, outcome: str, key: Optional[str] = None, detail: Optional[str] = None) -> None:
        """A shadow comparison finished (or was skipped/dropped)."""

    def writeback(self, domain: str, outcome: str) -> None:
        """A fallback write was copied back to Redis (outcome: written, kept_newer, error)."""


class NullObserver:
    """Observes nothing; for tests and tools that do not export metrics."""

    def operation(self, domain: str, backend: str, op: str, outcome: str, seconds: float) -> None:
        pass

    def fallback(self, domain: str, op: str, kind: str) -> None:
        pass

    def refused(self, domain: str, backend: str, op: str, kind: str, seconds: float, mirror_skipped: bool) -> None:
        pass

    def secondary_failure(self, domain: str, op: str) -> None:
        pass

    def secondary_skipped(self, domain: str, op: str) -> None:
        pass

    def shadow(self, domain: str, outcome: str, key: Optional[str] = None, detail: Optional[str] = None) -> None:
        pass

    def writeback(self, domain: str, outcome: str) -> None:
        pass
