"""What every lifecycle step shares: settings, domains, the agent sessions, the bus, clock and ids."""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from config.settings import Settings
from relay.agents.sessions import SessionRegistry
from relay.domains.audit import AuditIndex
from relay.domains.idempotency import IdempotencyKeys
from relay.domains.inflight import InflightCommands
from relay.domains.locale import UserLocales
from relay.domains.machines import MachineRegistry
from relay.jsontext import compact_bytes
from relay.lifecycle.dispatched import DispatchedCommands
from relay.locks import compute_lock
from relay.domains.ratelimit import RateLimiter
from relay.domains.templates import RetryTemplates
from relay.stores.base import StoreError
from relay.stores.domain import Claimable
from relay.stores.envelope import Entry, iso_ms

if TYPE_CHECKING:
    from relay.agents.bus import AgentBus

#: Opens a unit of work (``StoreRouter.bound``).
Scope = Callable[[], AbstractContextManager[Any]]
#: Commands whose audit records ``AuditTrail.hydrate`` reads in one round trip.
HYDRATE_CHUNK = 200

log = logging.getLogger("relay.lifecycle")


def new_instance_id() -> str:
    """``host:pid:nonce``: names this process as the holder of its agent sockets. The nonce keeps ids
    unique where host names and pids repeat (containers, a pid reused after a restart)."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Domains:
    idempotency: IdempotencyKeys
    machines: MachineRegistry
    inflight: InflightCommands
    audit: AuditIndex
    templates: RetryTemplates
    ratelimit: RateLimiter
    locale: UserLocales


class AuditTrail:
    """The audit index plus the append-only JSONL log (reference §8.2).

    An event is appended to the file only when the index accepted it as new, and
    hydration applies the file through the same idempotent path, so restarts and
    mixed memory/Redis modes never duplicate events (reference §13 items 8, 9).
    """

    #: How often ``log`` checks that its open file is still the one at ``path`` (moved by rotation).
    REOPEN_CHECK_S = 1.0

    def __init__(self, index: AuditIndex, log_path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.path: Optional[Path] = Path(log_path).resolve() if log_path else None
        #: Held around file calls that block without yielding (``os.write``, ``os.open``, ``os.stat``).
        self._file_lock = compute_lock()
        self._clock = clock
        self._fd: Optional[int] = None
        self._checked_at = 0.0
        self.file_errors = 0

    def record(self, event: dict[str, Any]) -> None:
        if self.index.apply(event):
            self.log([event])

    def record_over_known_then_claim(self, event: dict[str, Any], known: Entry,
                                     claimable: Optional[Claimable]) -> Optional[bool]:
        """``record_then_claim`` over the record as this process wrote it, without reading it
        (``AuditIndex.apply_to_known_then_claim``): ``None`` when it changed since (nothing recorded
        or claimed), else whether the claim succeeded."""
        claimed = self.index.apply_to_known_then_claim(event, known, claimable)
        if claimed is not None:
            self.log([event])
        return claimed

    def record_then_claim(self, event: dict[str, Any], claimable: Claimable) -> bool:
        """``record`` an agent's answer and claim its in-flight record once it is recorded
        (``AuditIndex.apply_then_claim``); whether the claim succeeded."""
        added, claimed = self.index.apply_then_claim(event, claimable)
        if added:
            self.log([event])
        return claimed

    def log(self, events: list[dict[str, Any]]) -> None:
        """Append events the index holds already (``record``, ``AuditIndex.open``) to the file.

        The file stays open between calls (one ``write`` per call instead of open, write, close).
        At most every ``REOPEN_CHECK_S`` it is compared with what is at ``path`` and reopened when
        the file was moved or removed, so a log rotation starts a new file within that time.
        """
        if self.path is None or not events:
            return
        data = b"".join(compact_bytes(e) + b"\n" for e in events)
        try:
            with self._file_lock:
                fd = self._open_fd()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        except OSError as exc:
            # The index already holds the event; a full or read-only disk must not fail the command.
            self.file_errors += 1
            self._close_fd()
            log.error("audit log append failed", extra={"event": "audit_file_failed", "error": type(exc).__name__})

    def _open_fd(self) -> int:
        """The open log file, reopened when rotation replaced it (the caller holds the lock)."""
        assert self.path is not None
        now = self._clock()
        if self._fd is not None and now - self._checked_at >= self.REOPEN_CHECK_S:
            self._checked_at = now
            try:
                current = os.stat(self.path)
                opened = os.fstat(self._fd)
                moved = (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino)
            except FileNotFoundError:
                moved = True
            if moved:
                self._close_fd()
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            try:
                self._fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, flags, 0o644)
            self._checked_at = now
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def events_from_disk(self) -> list[dict[str, Any]]:
        """Valid events of the JSONL file; unreadable lines are skipped."""
        if self.path is None or not self.path.exists():
            return []
        events = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and all(isinstance(event.get(k), str) for k in ("commandId", "timestamp", "status")):
                    events.append(event)
        return events

    def hydrate(self, chunk_scope: Scope = nullcontext, chunk: int = HYDRATE_CHUNK) -> int:
        """Replay the file into the index (idempotent); return how many events were new.

        Events go by command, in file order within each, ``chunk`` commands at a time, each chunk in
        a unit of work of its own (``chunk_scope``) that first asks for all of their records, and
        each command's events go into its record with one update. Where Redis is authoritative, a
        restart over an intact index reads a chunk in one round trip and writes nothing, and one
        after a data loss writes each record once. Event by event it was a round trip per event, two
        for one not yet recorded: a restart over a 72 MB log took two minutes before the relay
        answered.

        The index keeps the ``max_records`` most recently updated records, and this log's newest
        ``max_records`` commands are replayed, so an older command whose record is gone would be
        written only for the index to drop it at once: it is left out. An older command whose record
        is still there (another process updated it later) gets its missing events as any other."""
        by_command: dict[str, list[dict[str, Any]]] = {}
        for event in self.events_from_disk():
            by_command.setdefault(event["commandId"], []).append(event)
        last = {command_id: max(e["timestamp"] for e in events) for command_id, events in by_command.items()}
        newest = sorted(last.values(), reverse=True)
        kept_from = newest[self.index.max_records - 1] if len(newest) > self.index.max_records else ""
        commands = list(by_command.items())
        added = 0
        for start in range(0, len(commands), chunk):
            part = commands[start:start + chunk]
            with chunk_scope():
                for command_id, _ in part:
                    self.index.prefetch(command_id)
                for command_id, events in part:
                    if last[command_id] < kept_from and self.index.get(command_id) is None:
                        continue
                    added += self.index.apply_all(events)
        return added


@dataclass
class LifecycleContext:
    settings: Settings
    domains: Domains
    sessions: SessionRegistry
    audit: AuditTrail
    clock: Callable[[], int]
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    instance_id: str = field(default_factory=new_instance_id)
    #: Delivery to machines held by other processes; ``None`` in a single process without Redis.
    bus: Optional["AgentBus"] = None
    #: The records of the commands this process dispatched, as written, until their results come.
    dispatched: DispatchedCommands = field(default_factory=DispatchedCommands)

    def now_iso(self) -> str:
        return iso_ms(self.clock())

    def event(self, command_id: str, status: str, timestamp: Optional[str] = None, **fields_: Any) -> dict[str, Any]:
        """A CommandEvent with absent optional fields left out, in the reference's key order."""
        event: dict[str, Any] = {"commandId": command_id, "timestamp": timestamp or self.now_iso(), "status": status}
        for name in ("userId", "machineId", "kind", "summary", "metadata"):
            value = fields_.get(name)
            if value:
                event[name] = value
        return event

    def trace(self, machine_id: Optional[str], direction: str, stage: str, **fields_: Any) -> None:
        """Send a ``relay.trace`` frame to the machine's socket: here (held for the socket's next write
        inside ``SessionRegistry.holding``), or forwarded (unconfirmed) to the process holding it.
        Traces are informational: a store failure while looking the holder up is ignored."""
        if not machine_id:
            return
        trace: dict[str, Any] = {"direction": direction, "stage": stage}
        for name in ("commandId", "machineId", "userId", "kind", "status", "detail"):
            value = fields_.get(name)
            if name == "machineId":
                value = value or machine_id
            if value:
                trace[name] = value
        trace["at"] = self.now_iso()
        frame = {"type": "relay.trace", "trace": trace}
        if self.sessions.send(machine_id, frame, hold=True) or self.bus is None:
            return
        try:
            record = self.domains.machines.get(machine_id)
        except StoreError:
            return
        holder = record.get("holder") if record else None
        if holder and holder != self.instance_id:
            self.bus.forward(holder, machine_id, frame)

    def online_record(self, machine_id: str) -> Optional[dict[str, Any]]:
        """The machine's record when a command can be sent to it, else ``None``.

        The reference's online rule (a live, not stale store record held by a socket of this process),
        extended across processes: with the bus, a record held by another process counts too, and the
        holder confirms each delivery (``send``), so a holder that is gone ends as ``machine_offline``.
        """
        record = self.domains.machines.get(machine_id)
        if record is None or self.domains.machines.is_stale(record, self.clock()):
            return None
        session = self.sessions.get(machine_id)
        if session is not None and session.session_id == record["sessionId"]:
            return record
        if self.bus is not None and self.bus.reaches(record.get("holder")):
            return record
        return None

    def held_here(self, record: dict[str, Any]) -> bool:
        """Whether the machine ``record`` (from ``online_record``) describes is held by this process."""
        holder = record.get("holder")
        return self.bus is None or not holder or holder == self.instance_id

    def send(self, machine_id: str, frame: dict[str, Any], record: dict[str, Any], attached: Any = None) -> bool:
        """Send ``frame`` to the machine ``record`` (from ``online_record``) describes: through the bus
        when another process holds it (``True`` once the holder confirms), with ``attached`` for the
        holder's delivery listener, else on the local socket."""
        if not self.held_here(record):
            return self.bus.deliver(record["holder"], machine_id, frame, attached)  # type: ignore[union-attr]
        return self.sessions.send(machine_id, frame)
