"""The callback benchmark's fake agents: many agents on one thread that answer every command at once.

Each agent opens ``/agent``, sends ``agent.hello``, an ``agent.heartbeat`` every ``heartbeat_s``
(the agents' heartbeats spread over that period, as agents that connected at different times send
them, rather than all at once), answers pings with pongs, and answers each ``command`` frame with
the ``agent.result`` a real agent sends (status ``ok``). They share the two cores of the benchmark
machine with the relay, redis-server and the load generator, so they do as little as the protocol
allows: one selector loop for all sockets, frames read straight from the bytes (the relay's frames
are unmasked and whole), and only ``command`` frames parsed as JSON; the ``relay.trace`` frames that
come with every callback are counted and dropped. Frames they send are masked with a fresh random
key each, as RFC 6455 asks of a client.

``tests.support.agent_swarm`` also drives many agents on one thread, but through wsproto, whose
handshake and framing cost more than the agents of a CPU benchmark may; it keeps every frame and
answers no command. The benchmark used the agents of ``tests.cluster.harness`` before (a thread
each, every frame parsed and kept). They took about 0.5 ms of CPU per callback, half a core at the
relay's pace, against 0.13 ms for these. On two cores that starved the load generator now and then:
every request in flight then read some 150 ms slower, all at once, while the relay saw nothing slow
(``docs/performance.md``).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import urlsplit

_CONTINUATION, _TEXT, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x8, 0x9, 0xA
_FIN = 0x80
_MASKED = 0x80
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The start of the one frame these agents parse: every ``command`` frame the relay builds.
COMMAND_PREFIX = b'{"type":"command"'
SUMMARY = "Patch generated successfully"
READ_BYTES = 65536


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One whole client frame: FIN, ``opcode``, the mask bit and a random key, the masked payload."""
    size = len(payload)
    if size < 126:
        head = bytes((_FIN | opcode, _MASKED | size))
    elif size < 65536:
        head = bytes((_FIN | opcode, _MASKED | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((_FIN | opcode, _MASKED | 127)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + _masked(key, payload)


def _masked(key: bytes, payload: bytes) -> bytes:
    """``payload`` XORed with the repeated 4-byte ``key`` (RFC 6455, 5.3): masks and unmasks alike."""
    size = len(payload)
    if not size:
        return b""
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


def server_frames(buffer: bytearray) -> Iterator[tuple[bool, int, bytes]]:
    """``(fin, opcode, payload)`` of each whole frame at the start of ``buffer``, removed as they are
    read; a partial frame stays for the next call. The relay sends unmasked frames; a masked one is
    unmasked anyway."""
    while len(buffer) >= 2:
        first, second = buffer[0], buffer[1]
        size, offset = second & 0x7F, 2
        if size == 126:
            if len(buffer) < 4:
                return
            size, offset = int.from_bytes(buffer[2:4], "big"), 4
        elif size == 127:
            if len(buffer) < 10:
                return
            size, offset = int.from_bytes(buffer[2:10], "big"), 10
        key = b""
        if second & _MASKED:
            key, offset = bytes(buffer[offset:offset + 4]), offset + 4
        if len(buffer) < offset + size:
            return
        payload = bytes(buffer[offset:offset + size])
        del buffer[:offset + size]
        if key:
            payload = _masked(key, payload)
        yield bool(first & _FIN), first & 0x0F, payload


def result_for(command_frame: bytes, machine_id: str) -> Optional[bytes]:
    """The ``agent.result`` text answering a ``command`` frame, or ``None`` when it is not one."""
    frame = json.loads(command_frame)
    command = frame.get("command") if frame.get("type") == "command" else None
    if not isinstance(command, dict) or not command.get("commandId"):
        return None
    return json.dumps({"type": "agent.result", "result": {
        "commandId": command["commandId"], "machineId": machine_id, "status": "ok",
        "summary": SUMMARY, "createdAt": _iso_now()}}, separators=(",", ":")).encode()


class _Agent:
    def __init__(self, machine_id: str, sock: socket.socket) -> None:
        self.machine_id = machine_id
        self.sock = sock
        self.buffer = bytearray()
        self.fragments: Optional[bytearray] = None
        self.next_heartbeat = 0.0


class AnsweringAgents:
    """Agents ``machine_ids`` connected to ``agent_url`` (``ws://host:port/agent``) by ``connect``,
    then served by ``serve`` until ``stopped()`` is true. Counts what they received and answered."""

    def __init__(self, agent_url: str, machine_ids: list[str], *, heartbeat_s: float = 10.0) -> None:
        parts = urlsplit(agent_url)
        self._address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._host = parts.netloc
        self._path = parts.path or "/"
        self._machine_ids = list(machine_ids)
        self._heartbeat_s = heartbeat_s
        self._selector = selectors.DefaultSelector()
        self._agents: list[_Agent] = []
        self.commands = 0
        self.results = 0
        self.traces = 0
        self.closed = 0

    def connect(self, timeout_s: float = 10.0) -> None:
        """Open every agent's socket, complete its upgrade and send its hello; raises ``OSError``
        when the relay refuses or does not answer in time."""
        for machine_id in self._machine_ids:
            sock = socket.create_connection(self._address, timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            agent = _Agent(machine_id, sock)
            agent.buffer += self._upgrade(sock)
            sock.setblocking(False)
            self._agents.append(agent)
            self._selector.register(sock, selectors.EVENT_READ, agent)
            self._send_json(agent, {"type": "agent.hello", "machineId": machine_id, "version": "bench",
                                    "capabilities": []})
        connected = time.monotonic()
        for number, agent in enumerate(self._agents, 1):
            agent.next_heartbeat = connected + self._heartbeat_s * number / len(self._agents)

    def _upgrade(self, sock: socket.socket) -> bytes:
        """Send the upgrade request, check the 101 and its accept key; return bytes read past it."""
        key = base64.b64encode(os.urandom(16))
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                     % (self._path.encode(), self._host.encode(), key))
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the relay closed the connection during the upgrade")
            response += chunk
        head, _, rest = response.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if lines[0].split(b" ")[1:2] != [b"101"]:
            raise ConnectionError(f"upgrade refused: {lines[0].decode('latin-1')}")
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        if not any(line.lower().startswith(b"sec-websocket-accept:") and line.split(b":", 1)[1].strip() == accept
                   for line in lines[1:]):
            raise ConnectionError("upgrade answered without the right Sec-WebSocket-Accept")
        return rest

    def serve(self, stopped: Callable[[], bool], poll_s: float = 0.2) -> None:
        """Answer frames until ``stopped()`` or every socket is closed; then close them all."""
        for agent in self._agents:
            self._drain(agent)
        try:
            while self._selector.get_map() and not stopped():
                for key, _events in self._selector.select(poll_s):
                    self._on_readable(key.data)
                self._send_heartbeats_due(time.monotonic())
        finally:
            self.close()

    def heartbeats_due(self) -> list[float]:
        """When each agent sends its next heartbeat (``time.monotonic``)."""
        return [agent.next_heartbeat for agent in self._agents]

    def _send_heartbeats_due(self, now: float) -> None:
        for agent in list(self._agents):
            if now >= agent.next_heartbeat:
                agent.next_heartbeat = now + self._heartbeat_s
                self._send_json(agent, {"type": "agent.heartbeat", "machineId": agent.machine_id,
                                        "sentAt": _iso_now(), "runningCount": 0, "pendingCount": 0})

    def close(self) -> None:
        for agent in list(self._agents):
            self._finish(agent)

    def _on_readable(self, agent: _Agent) -> None:
        try:
            data = agent.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish(agent)
            return
        agent.buffer += data
        self._drain(agent)

    def _drain(self, agent: _Agent) -> None:
        for fin, opcode, payload in server_frames(agent.buffer):
            if opcode == _TEXT and not fin:
                agent.fragments = bytearray(payload)
                continue
            if opcode == _CONTINUATION:
                if agent.fragments is None:  # the rest of a binary message: nothing an agent reads
                    continue
                agent.fragments += payload
                if not fin:
                    continue
                opcode, payload, agent.fragments = _TEXT, bytes(agent.fragments), None
            if opcode == _TEXT:
                self._on_text(agent, payload)
            elif opcode == _PING:
                self._send(agent, masked_frame(_PONG, payload))
            elif opcode == _CLOSE:
                self._send(agent, masked_frame(_CLOSE, payload[:2]))
                self._finish(agent)
                return

    def _on_text(self, agent: _Agent, payload: bytes) -> None:
        if not payload.startswith(COMMAND_PREFIX):
            self.traces += 1
            return
        self.commands += 1
        answer = result_for(payload, agent.machine_id)
        if answer is not None:
            self._send(agent, masked_frame(_TEXT, answer))
            self.results += 1

    def _send_json(self, agent: _Agent, frame: dict[str, Any]) -> None:
        self._send(agent, masked_frame(_TEXT, json.dumps(frame, separators=(",", ":")).encode()))

    def _send(self, agent: _Agent, data: bytes) -> None:
        """Write a whole frame. The socket is non-blocking; a full send buffer (the relay not reading)
        is waited out here, which a benchmark agent may do."""
        view = memoryview(data)
        while view:
            try:
                view = view[agent.sock.send(view):]
            except BlockingIOError:
                select.select([], [agent.sock], [], 1.0)
            except OSError:
                self._finish(agent)
                return

    def _finish(self, agent: _Agent) -> None:
        if agent in self._agents:
            self._agents.remove(agent)
            self._selector.unregister(agent.sock)
            agent.sock.close()
            self.closed += 1
