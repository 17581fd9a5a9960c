"""``bench.answering_agents``: the callback benchmark's agents speak the agent protocol as a real one does.

The frames they send are read back with the relay's own decoder (``relay.agents.frames.ClientFrames``)
and the frames they read are built by wsproto, so neither side of the framing is checked against
itself. The last test runs them against a live relay: every command is answered and audited.
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from bench import callbacks
from bench.answering_agents import AnsweringAgents, masked_frame, server_frames
from bench.httpload import HttpClient
from relay.agents.frames import ClientFrames, ForWsproto
from tests.support.live_relay import live_relay

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _server_frame(payload: bytes, opcode: Opcode = Opcode.TEXT, fin: bool = True) -> bytes:
    return bytes(FrameProtocol(client=False, extensions=[])._serialize_frame(opcode, payload, fin=fin))


def _decoded(data: bytes) -> list[Any]:
    return ClientFrames(1 << 20).feed(data)


@pytest.mark.parametrize("size", [0, 3, 125, 126, 65535, 65536])
def test_a_frame_the_agents_send_is_one_masked_message_to_the_relay(size: int) -> None:
    payload = bytes(97 + i % 26 for i in range(size))
    frame = masked_frame(0x1, payload)

    assert frame[1] & 0x80, "client frames are masked"
    assert _decoded(frame) == [payload.decode()]


def test_each_frame_is_masked_with_a_fresh_key() -> None:
    first, second = masked_frame(0x1, b"same text"), masked_frame(0x1, b"same text")

    assert first[2:6] != second[2:6]
    assert first[6:] != b"same text"


@pytest.mark.parametrize("size", [0, 10, 125, 126, 65535, 65536])
def test_frames_split_anywhere_are_read_whole_and_in_order(size: int) -> None:
    payload = b"x" * size
    stream = _server_frame(payload) + _server_frame(b"second")
    buffer = bytearray()
    read = []
    step = max(1, len(stream) // 40)
    for start in range(0, len(stream), step):
        buffer += stream[start:start + step]
        read.extend(server_frames(buffer))

    assert read == [(True, 0x1, payload), (True, 0x1, b"second")]
    assert not buffer


def test_a_partial_frame_is_kept_for_the_next_read() -> None:
    frame = _server_frame(b"x" * 300)
    buffer = bytearray(frame[:3])

    assert list(server_frames(buffer)) == []
    assert bytes(buffer) == frame[:3]


def test_an_agent_sends_a_heartbeat_every_period() -> None:
    relay = _FakeRelay([b""] * 15 + [_server_frame(b"", Opcode.CLOSE)])
    agents = AnsweringAgents(f"ws://127.0.0.1:{relay.port}/agent", ["m-3"], heartbeat_s=0.06)

    agents.connect()
    _serve_until_closed(agents)
    relay.join()

    texts = [json.loads(item) for item in _decoded(relay.received) if isinstance(item, str)]
    heartbeats = [t for t in texts if t["type"] == "agent.heartbeat"]
    assert len(heartbeats) >= 2
    assert all(h["machineId"] == "m-3" and h["runningCount"] == 0 and h["pendingCount"] == 0 for h in heartbeats)


def test_the_agents_heartbeats_are_spread_over_the_period() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    fake = threading.Thread(target=_upgrade_all, args=(listener, 4), daemon=True)
    fake.start()
    agents = AnsweringAgents(f"ws://127.0.0.1:{port}/agent", [f"m-{i}" for i in range(4)], heartbeat_s=8.0)
    before = time.monotonic()
    agents.connect()
    due = agents.heartbeats_due()
    agents.close()
    fake.join(5)
    listener.close()

    gaps = [later - earlier for earlier, later in zip(due, due[1:])]
    assert all(gap == pytest.approx(2.0, abs=0.01) for gap in gaps)
    assert before + 2.0 <= due[0] <= time.monotonic() + 2.0


def _upgrade_all(listener: socket.socket, count: int) -> None:
    """Accept ``count`` agents and upgrade each (the bytes they send afterwards are not read)."""
    held = []
    for _ in range(count):
        conn, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        conn.sendall(_accepting(request))
        held.append(conn)
    for conn in held:
        conn.close()


def _accepting(request: bytes) -> bytes:
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def _unmasked(frame: bytes) -> bytes:
    size = frame[1] & 0x7F
    key, payload = frame[2:6], frame[6:6 + size]
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class _FakeRelay:
    """One listening socket that upgrades each agent and then plays ``script`` (bytes to send) to it,
    keeping every byte the agent sends, until the agent closes."""

    def __init__(self, script: list[bytes]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._script = script
        self.received = b""
        self.upgrade_request = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            while b"\r\n\r\n" not in self.upgrade_request:
                self.upgrade_request += conn.recv(4096)
            conn.sendall(_accepting(self.upgrade_request))
            for piece in self._script:
                conn.sendall(piece)
                time.sleep(0.02)
            conn.settimeout(5)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.received += data

    def join(self) -> None:
        self._thread.join(10)
        self._listener.close()


def _serve_until_closed(agents: AnsweringAgents, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    agents.serve(lambda: time.monotonic() > deadline, poll_s=0.05)


def test_an_agent_says_hello_answers_commands_and_pings_and_closes_when_asked() -> None:
    command = json.dumps({"type": "command", "command": {"commandId": "c-1", "machineId": "m-1",
                                                         "kind": "status"}}, separators=(",", ":")).encode()
    trace = b'{"type":"relay.trace","trace":{"stage":"command_received"}}'
    stream = _server_frame(trace) + _server_frame(b"ping-data", Opcode.PING) + _server_frame(command)
    relay = _FakeRelay([stream[:7], stream[7:40], stream[40:], _server_frame(b"\x03\xe8", Opcode.CLOSE)])
    agents = AnsweringAgents(f"ws://127.0.0.1:{relay.port}/agent", ["m-1"])

    agents.connect()
    _serve_until_closed(agents)
    relay.join()

    assert relay.upgrade_request.startswith(b"GET /agent HTTP/1.1\r\n")
    sent = _decoded(relay.received)
    texts = [json.loads(item) for item in sent if isinstance(item, str)]
    controls = [item.data for item in sent if isinstance(item, ForWsproto)]
    assert texts[0] == {"type": "agent.hello", "machineId": "m-1", "version": "bench", "capabilities": []}
    assert texts[1]["type"] == "agent.result"
    assert {k: texts[1]["result"][k] for k in ("commandId", "machineId", "status")} == {
        "commandId": "c-1", "machineId": "m-1", "status": "ok"}
    assert [frame[0] & 0x0F for frame in controls] == [0xA, 0x8], "a pong, then the close answered"
    assert _unmasked(controls[0]) == b"ping-data"
    assert (agents.commands, agents.results, agents.traces, agents.closed) == (1, 1, 1, 1)


def test_a_fragmented_command_is_answered_once_whole() -> None:
    command = json.dumps({"type": "command", "command": {"commandId": "c-2", "kind": "status"}},
                         separators=(",", ":")).encode()
    pieces = [_server_frame(command[:10], Opcode.TEXT, fin=False),
              _server_frame(command[10:20], Opcode.CONTINUATION, fin=False),
              _server_frame(command[20:], Opcode.CONTINUATION, fin=True),
              _server_frame(b"", Opcode.CLOSE)]
    relay = _FakeRelay(pieces)
    agents = AnsweringAgents(f"ws://127.0.0.1:{relay.port}/agent", ["m-2"])

    agents.connect()
    _serve_until_closed(agents)
    relay.join()

    results = [json.loads(item) for item in _decoded(relay.received) if isinstance(item, str)][1:]
    assert [r["result"]["commandId"] for r in results] == ["c-2"]


@pytest.fixture
def relay_with_agents() -> Iterator[tuple[Any, AnsweringAgents]]:
    env = {"ALLOWLIST_USERS": "user-0000,user-0001", "RELAY_ADMIN_TOKEN": callbacks.ADMIN_TOKEN,
           "STORE_PHASE": "memory", "LOG_LEVEL": "WARNING"}
    with live_relay(env=env) as relay:
        agents = AnsweringAgents(relay.agent_url, ["bench-m0", "bench-m1"])
        agents.connect()
        stop = threading.Event()
        thread = threading.Thread(target=agents.serve, args=(stop.is_set,), daemon=True)
        thread.start()
        try:
            yield relay, agents
        finally:
            stop.set()
            thread.join(5)


def test_every_command_the_relay_sends_is_answered_and_its_result_audited(relay_with_agents: Any) -> None:
    relay, agents = relay_with_agents
    callbacks._wait_registered(relay, 2, timeout_s=15)
    poster = HttpClient(relay.port)
    reader = HttpClient(relay.port, {"x-admin-token": callbacks.ADMIN_TOKEN})
    try:
        ids = []
        for index in range(6):
            body = {"msgId": f"agents-test-{index}", "userId": f"user-000{index % 2}",
                    "machineId": f"bench-m{index % 2}", "text": callbacks.TEXT}
            status, payload = poster.request("POST", callbacks.CALLBACK_PATH, json.dumps(body).encode())
            assert callbacks._dispatched(status, payload), payload
            ids.append(json.loads(payload)["commandId"])
        deadline = time.monotonic() + 10
        audited = set()
        while time.monotonic() < deadline and len(audited) < len(ids):
            for command_id in set(ids) - audited:
                _, record = reader.request("GET", f"/commands/{command_id}")
                if json.loads(record).get("status") == "agent_ok":
                    audited.add(command_id)
            time.sleep(0.05)
    finally:
        poster.close()
        reader.close()

    assert audited == set(ids)
    assert agents.results == len(ids)
