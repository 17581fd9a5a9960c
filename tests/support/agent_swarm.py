"""Many fake agents on one thread: for capacity tests and ``bench/agents.py``.

Each agent opens ``/agent``, sends ``agent.hello`` when the upgrade is accepted and
``agent.heartbeat`` every ``heartbeat_s``, answers pings, and keeps every JSON frame it receives.
One selector loop drives all sockets (wsproto does the framing), so a swarm of hundreds costs the
test process one thread.
"""
from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

Frame = dict[str, Any]


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Agent:
    def __init__(self, machine_id: str, sock: socket.socket) -> None:
        self.machine_id = machine_id
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.state = "connecting"
        self.received: list[Frame] = []
        self.partial = ""
        self.next_heartbeat = 0.0
        self.close_code: Optional[int] = None


class AgentSwarm:
    """``count`` agents named ``{prefix}-{i}`` against ``agent_url`` (``ws://host:port/agent``)."""

    def __init__(self, agent_url: str, count: int, *, prefix: str = "swarm", heartbeat_s: float = 10.0) -> None:
        parts = urlsplit(agent_url)
        self._address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._host_header = parts.netloc
        self._target = parts.path or "/"
        self._heartbeat_s = heartbeat_s
        self._machine_ids = [f"{prefix}-{i}" for i in range(count)]
        self._agents: dict[int, _Agent] = {}
        self._selector = selectors.DefaultSelector()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.connect_errors = 0

    def __enter__(self) -> "AgentSwarm":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def machine_ids(self) -> list[str]:
        return list(self._machine_ids)

    def start(self) -> None:
        """Connect every agent (sends the upgrade requests) and start the loop thread."""
        for machine_id in self._machine_ids:
            try:
                sock = socket.create_connection(self._address, timeout=10)
            except OSError:
                self.connect_errors += 1
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            agent = _Agent(machine_id, sock)
            self._agents[sock.fileno()] = agent
            sock.sendall(agent.ws.send(Request(host=self._host_header, target=self._target)))
            self._selector.register(sock, selectors.EVENT_READ, agent)
        self._thread = threading.Thread(target=self._run, name="agent-swarm", daemon=True)
        self._thread.start()

    def count(self, state: str) -> int:
        with self._changed:
            return sum(1 for agent in self._agents.values() if agent.state == state)

    def wait_until(self, condition: Callable[["AgentSwarm"], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.2))
            return True

    def received(self, machine_id: str) -> list[Frame]:
        with self._changed:
            for agent in self._agents.values():
                if agent.machine_id == machine_id:
                    return list(agent.received)
        return []

    def agents_that_received(self, predicate: Callable[[Frame], bool]) -> int:
        with self._changed:
            return sum(1 for a in self._agents.values() if any(predicate(f) for f in a.received))

    def close_codes(self) -> list[Optional[int]]:
        with self._changed:
            return [a.close_code for a in self._agents.values() if a.state == "closed"]

    def close(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(10)
        for agent in list(self._agents.values()):
            if agent.state == "open":
                try:
                    agent.sock.sendall(agent.ws.send(CloseConnection(code=1000)))
                except (OSError, LocalProtocolError):
                    pass
            agent.sock.close()
        self._selector.close()

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=0.1):
                self._on_readable(key.data)
            now = time.monotonic()
            for agent in list(self._agents.values()):
                if agent.state == "open" and now >= agent.next_heartbeat:
                    agent.next_heartbeat = now + self._heartbeat_s
                    self._send_json(agent, {
                        "type": "agent.heartbeat", "machineId": agent.machine_id,
                        "sentAt": _iso_now(), "runningCount": 0, "pendingCount": 0,
                    })

    def _on_readable(self, agent: _Agent) -> None:
        try:
            data = agent.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._finish(agent, agent.close_code)
            return
        agent.ws.receive_data(data)
        for event in agent.ws.events():
            if isinstance(event, AcceptConnection):
                with self._changed:
                    agent.state = "open"
                    self._changed.notify_all()
                agent.next_heartbeat = time.monotonic() + self._heartbeat_s
                self._send_json(agent, {
                    "type": "agent.hello", "machineId": agent.machine_id,
                    "version": "swarm", "capabilities": [],
                })
            elif isinstance(event, RejectConnection):
                self._finish(agent, None, state="rejected")
                return
            elif isinstance(event, TextMessage):
                agent.partial += event.data
                if event.message_finished:
                    frame = json.loads(agent.partial)
                    agent.partial = ""
                    with self._changed:
                        agent.received.append(frame)
                        self._changed.notify_all()
            elif isinstance(event, Ping):
                self._send(agent, agent.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                try:
                    self._send(agent, agent.ws.send(event.response()))
                except LocalProtocolError:
                    pass
                self._finish(agent, event.code)
                return

    def _send_json(self, agent: _Agent, frame: Frame) -> None:
        self._send(agent, agent.ws.send(TextMessage(data=json.dumps(frame))))

    def _send(self, agent: _Agent, data: bytes) -> None:
        try:
            agent.sock.sendall(data)
        except OSError:
            self._finish(agent, agent.close_code)

    def _finish(self, agent: _Agent, code: Optional[int], state: str = "closed") -> None:
        if agent.state in ("closed", "rejected"):
            return
        try:
            self._selector.unregister(agent.sock)
        except (KeyError, ValueError):
            pass
        with self._changed:
            agent.state = state
            agent.close_code = int(code) if code is not None else None
            self._changed.notify_all()
