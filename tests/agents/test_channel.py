"""The /agent channel against a live gunicorn (config/gunicorn.py) serving tests.agents.app_for_tests."""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Optional

import pytest
import requests
import websocket
from flask import Flask

from relay.agents.channel import register_agent_channel
from relay.agents.sessions import SessionRegistry
from tests.agents.app_for_tests import RecordingHandler
from tests.support.live_relay import TEST_APP, LiveRelay, live_relay

Event = dict[str, Any]


@pytest.fixture(scope="module")
def relay() -> Iterator[LiveRelay]:
    env = {"AGENT_TEST_PING_S": "5", "AGENT_TEST_IDLE_S": "30", "AGENT_TEST_MAX_BYTES": "65536"}
    with live_relay(TEST_APP, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def lively_relay() -> Iterator[LiveRelay]:
    """Short liveness settings: pings every 0.3 s, silence closes after 1.2 s."""
    env = {"AGENT_TEST_PING_S": "0.3", "AGENT_TEST_IDLE_S": "1.2", "AGENT_TEST_CLOSE_GRACE_S": "0.5"}
    with live_relay(TEST_APP, env=env) as running:
        yield running


# -- helpers --------------------------------------------------------------------------------------
def machine() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def connect(relay: LiveRelay, path: str = "/agent") -> websocket.WebSocket:
    return websocket.create_connection(relay.ws_url + path, timeout=5)


def hello(ws: websocket.WebSocket, machine_id: str) -> dict[str, Any]:
    """Say hello and return the relay.trace the test handler answers with."""
    ws.send(json.dumps({"type": "agent.hello", "machineId": machine_id, "version": "1", "capabilities": []}))
    return json.loads(ws.recv())


def events(relay: LiveRelay) -> list[Event]:
    return list(requests.get(relay.url("/_test/events"), timeout=5).json()["events"])


def wait_for(relay: LiveRelay, condition: Callable[[list[Event]], bool], timeout_s: float = 5.0) -> list[Event]:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = events(relay)
        if condition(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def of_session(seen: list[Event], session_id: str) -> list[Event]:
    return [e for e in seen if e["session"] == session_id]


def session_of(relay: LiveRelay, machine_id: str) -> str:
    seen = wait_for(relay, lambda s: any(e["event"] == "hello" and e["machine"] == machine_id for e in s))
    return [e["session"] for e in seen if e["event"] == "hello" and e["machine"] == machine_id][-1]


def disconnects(seen: list[Event], session_id: str) -> list[Event]:
    return [e for e in of_session(seen, session_id) if e["event"] == "disconnect"]


def registry(relay: LiveRelay) -> dict[str, Any]:
    return dict(requests.get(relay.url("/_test/registry"), timeout=5).json())


def close_frame_code(ws: websocket.WebSocket, timeout_s: float = 5.0) -> Optional[int]:
    """Read until the relay's close frame; its status code (``None`` if the socket just ended)."""
    ws.settimeout(timeout_s)
    try:
        while True:
            frame = ws.recv_frame()  # raw frames: no automatic close reply, which may meet a reset
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                data = frame.data
                return int(struct.unpack("!H", data[:2])[0]) if len(data) >= 2 else None
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        return None


class RawAgent:
    """A hand-rolled client socket: it never answers pings, so it plays a dead or odd peer."""

    def __init__(
        self, relay: LiveRelay, extra_headers: str = "", key: Optional[str] = None, target: str = "/agent"
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
        key_header = f"Sec-WebSocket-Key: {key}\r\n" if key else ""
        self.sock.sendall(
            (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\n{key_header}Sec-WebSocket-Version: 13\r\n{extra_headers}\r\n").encode()
        )
        self.response = b""
        while b"\r\n\r\n" not in self.response:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.response += chunk

    @property
    def status(self) -> int:
        return int(self.response.split(b" ", 2)[1])

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        self.sock.close()


# -- frames ---------------------------------------------------------------------------------------
def test_frames_reach_the_handler_in_order_each_inside_a_frame_scope(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    trace = hello(ws, machine_id)
    for n in range(5):
        ws.send(json.dumps({"type": "agent.heartbeat", "machineId": machine_id, "n": n}))
    ws.send(json.dumps({"type": "agent.result", "result": {"commandId": "c1", "status": "ok", "summary": "done"}}))
    session_id = session_of(relay, machine_id)

    seen = of_session(wait_for(relay, lambda s: len(of_session(s, session_id)) >= 7), session_id)
    ws.close()

    assert trace["type"] == "relay.trace" and trace["trace"]["stage"] == "agent_connected"
    assert [e["event"] for e in seen] == ["hello"] + ["heartbeat"] * 5 + ["result"]
    assert [e["frame"]["n"] for e in seen if e["event"] == "heartbeat"] == list(range(5))
    assert seen[-1]["frame"]["result"]["summary"] == "done"
    assert all(e["in_scope"] for e in seen)
    assert all(e["machine"] == machine_id for e in seen)


def test_invalid_payloads_are_logged_without_contents_and_ignored(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    session_id = session_of(relay, machine_id)
    marker = f"secret-{uuid.uuid4().hex}"
    for bad in (f"not json {marker}", f'["{marker}"]', "null", f'"{marker}"', "NaN", "{"):
        ws.send(bad)
    ws.send(json.dumps({"type": "agent.heartbeat", "machineId": machine_id, "after": "bad"}))

    seen = of_session(wait_for(relay, lambda s: len(of_session(s, session_id)) >= 2), session_id)

    assert [e["event"] for e in seen] == ["hello", "heartbeat"]
    assert ws.connected
    logs = relay.logs()
    assert logs.count(f"invalid ws payload: session {session_id}") == 6
    assert marker not in logs
    ws.close()


def test_binary_frames_are_decoded_as_utf8(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    session_id = session_of(relay, machine_id)

    ws.send_binary(json.dumps({"type": "agent.heartbeat", "machineId": machine_id, "note": "开发机"},
                              ensure_ascii=False).encode("utf-8"))

    seen = of_session(wait_for(relay, lambda s: len(of_session(s, session_id)) >= 2), session_id)
    assert seen[-1]["event"] == "heartbeat" and seen[-1]["frame"]["note"] == "开发机"
    ws.close()


def test_unknown_types_are_ignored_silently(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    session_id = session_of(relay, machine_id)
    for odd in ({"type": "agent.unknown"}, {"type": 5}, {"machineId": machine_id}, {"type": "command"}):
        ws.send(json.dumps(odd))
    ws.send(json.dumps({"type": "agent.heartbeat", "machineId": machine_id}))

    seen = of_session(wait_for(relay, lambda s: len(of_session(s, session_id)) >= 2), session_id)

    assert [e["event"] for e in seen] == ["hello", "heartbeat"]
    assert f"invalid ws payload: session {session_id}" not in relay.logs()
    ws.close()


def test_a_handler_exception_is_logged_and_the_socket_stays_open(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    session_id = session_of(relay, machine_id)

    ws.send(json.dumps({"type": "agent.heartbeat", "machineId": machine_id, "explode": True}))
    ws.send(json.dumps({"type": "agent.result", "result": {"commandId": "c2"}}))

    seen = of_session(wait_for(relay, lambda s: len(of_session(s, session_id)) >= 3), session_id)
    assert [e["event"] for e in seen] == ["hello", "heartbeat", "result"]
    logs = relay.logs()
    assert "agent frame handler failed: on_heartbeat raised RuntimeError at " in logs
    assert "handler exploded (test)" not in logs
    assert requests.post(relay.url(f"/_test/machines/{machine_id}/send"), json={"type": "ping-test"},
                         timeout=5).json() == {"sent": True}
    assert json.loads(ws.recv()) == {"type": "ping-test"}
    ws.close()


def connected(relay: LiveRelay) -> tuple[websocket.WebSocket, str, str]:
    """A new agent socket that said hello: the socket, its machine id and its session id."""
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    return ws, machine_id, session_of(relay, machine_id)


def result(command_id: str, summary: str, gate: Optional[str] = None) -> str:
    frame: dict[str, Any] = {"type": "agent.result", "result": {"commandId": command_id, "summary": summary}}
    if gate is not None:
        frame["gate"] = gate
    return json.dumps(frame)


def open_gate(relay: LiveRelay, name: str) -> None:
    requests.post(relay.url(f"/_test/gates/{name}/open"), timeout=5).raise_for_status()


def handled(seen: list[Event], kind: str = "result") -> list[str]:
    return [e["frame"]["result"]["summary"] for e in seen if e["event"] == kind]


def test_results_of_different_commands_are_handled_side_by_side(relay: LiveRelay) -> None:
    assert_results_side_by_side(relay)


def test_results_are_handled_side_by_side_on_gthread_workers_too() -> None:
    with live_relay(TEST_APP, env={"RELAY_WORKER_CLASS": "gthread"}) as threaded:
        assert_results_side_by_side(threaded)


def assert_results_side_by_side(relay: LiveRelay) -> None:
    ws, machine_id, session_id = connected(relay)
    gate = uuid.uuid4().hex

    ws.send(result("c1", "slow", gate))
    ws.send(result("c2", "quick"))
    ws.send(json.dumps({"type": "agent.heartbeat", "machineId": machine_id}))
    seen = of_session(wait_for(relay, lambda s: len(of_session(s, session_id)) >= 4), session_id)
    assert handled(seen, "result_waiting") == ["slow"]
    assert handled(seen) == ["quick"]
    assert [e["event"] for e in seen].count("heartbeat") == 1

    open_gate(relay, gate)
    seen = of_session(wait_for(relay, lambda s: len(handled(of_session(s, session_id))) >= 2), session_id)
    assert handled(seen) == ["quick", "slow"]
    assert all(e["in_scope"] for e in seen)
    ws.close()


def test_results_of_one_command_are_handled_in_the_order_they_came(relay: LiveRelay) -> None:
    ws, _, session_id = connected(relay)
    gate = uuid.uuid4().hex

    ws.send(result("c1", "progress", gate))
    ws.send(result("c1", "final"))
    ws.send(result("c2", "other"))
    wait_for(relay, lambda s: handled(of_session(s, session_id)) == ["other"])
    time.sleep(0.3)
    assert handled(of_session(events(relay), session_id)) == ["other"]

    open_gate(relay, gate)
    seen = of_session(wait_for(relay, lambda s: len(handled(of_session(s, session_id))) >= 3), session_id)
    assert handled(seen) == ["other", "progress", "final"]
    ws.close()


def test_the_reader_waits_while_results_at_once_are_running() -> None:
    with live_relay(TEST_APP, env={"AGENT_TEST_RESULTS_AT_ONCE": "2"}) as limited:
        ws, machine_id, session_id = connected(limited)
        first, second = uuid.uuid4().hex, uuid.uuid4().hex

        ws.send(result("c1", "one", first))
        ws.send(result("c2", "two", second))
        ws.send(result("c3", "three"))
        ws.send(json.dumps({"type": "agent.heartbeat", "machineId": machine_id}))
        wait_for(limited, lambda s: len(handled(of_session(s, session_id), "result_waiting")) >= 2)
        time.sleep(0.3)
        seen = of_session(events(limited), session_id)
        assert handled(seen) == []
        assert "heartbeat" not in [e["event"] for e in seen]

        open_gate(limited, first)
        seen = of_session(wait_for(limited, lambda s: any(e["event"] == "heartbeat" for e in s)
                                   and "three" in handled(of_session(s, session_id))), session_id)
        assert handled(seen) == ["one", "three"]
        assert "heartbeat" in [e["event"] for e in seen]
        open_gate(limited, second)
        ws.close()


def test_a_closed_sockets_results_finish_before_the_disconnect(relay: LiveRelay) -> None:
    ws, _, session_id = connected(relay)
    gate = uuid.uuid4().hex

    ws.send(result("c1", "last words", gate))
    wait_for(relay, lambda s: bool(handled(of_session(s, session_id), "result_waiting")))
    ws.close()
    time.sleep(0.3)
    assert not disconnects(events(relay), session_id)

    open_gate(relay, gate)
    seen = of_session(wait_for(relay, lambda s: bool(disconnects(s, session_id))), session_id)
    assert [e["event"] for e in seen][-2:] == ["result", "disconnect"]


def test_the_disconnect_waits_for_results_at_most_results_drain_s_and_says_so() -> None:
    with live_relay(TEST_APP, env={"AGENT_TEST_RESULTS_DRAIN_S": "0.3"}) as draining:
        ws, _, session_id = connected(draining)
        gate = uuid.uuid4().hex
        ws.send(result("c1", "stuck", gate))
        wait_for(draining, lambda s: bool(handled(of_session(s, session_id), "result_waiting")))
        ws.close()

        seen = of_session(wait_for(draining, lambda s: bool(disconnects(s, session_id))), session_id)
        assert [e["event"] for e in seen] == ["hello", "result_waiting", "disconnect"]
        assert f"agent socket closed with 1 results still being handled: session {session_id}" in draining.logs()
        open_gate(draining, gate)


def test_a_message_over_the_size_limit_closes_the_socket_with_1009(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    session_id = session_of(relay, machine_id)

    ws.send(json.dumps({"type": "agent.heartbeat", "pad": "x" * 70_000}))

    assert close_frame_code(ws) == 1009
    seen = wait_for(relay, lambda s: bool(disconnects(s, session_id)))
    assert [e["event"] for e in of_session(seen, session_id)] == ["hello", "disconnect"]


# -- sessions -------------------------------------------------------------------------------------
def test_a_newer_hello_closes_the_older_socket_and_keeps_the_newer_registered(relay: LiveRelay) -> None:
    machine_id = machine()
    older = connect(relay)
    hello(older, machine_id)
    older_id = session_of(relay, machine_id)
    newer = connect(relay)
    hello(newer, machine_id)

    assert close_frame_code(older) == 1000
    seen = wait_for(relay, lambda s: bool(disconnects(s, older_id)))
    newer_id = session_of(relay, machine_id)
    assert newer_id != older_id
    assert [e["detached"] for e in disconnects(seen, older_id)] == [False]
    assert registry(relay)["machines"][machine_id] == newer_id
    assert requests.post(relay.url(f"/_test/machines/{machine_id}/send"), json={"type": "command"},
                         timeout=5).json() == {"sent": True}
    assert json.loads(newer.recv()) == {"type": "command"}
    newer.close()


def test_a_second_hello_with_another_machine_id_moves_the_registration(relay: LiveRelay) -> None:
    first, second = machine(), machine()
    ws = connect(relay)
    hello(ws, first)
    hello(ws, second)

    machines = registry(relay)["machines"]
    assert second in machines and first not in machines
    ws.close()


def test_disconnect_reaches_the_handler_exactly_once(relay: LiveRelay) -> None:
    polite, abrupt = machine(), machine()
    ws_polite = connect(relay)
    hello(ws_polite, polite)
    ws_abrupt = connect(relay)
    hello(ws_abrupt, abrupt)
    polite_id, abrupt_id = session_of(relay, polite), session_of(relay, abrupt)

    ws_polite.close()
    raw = ws_abrupt.sock
    assert raw is not None
    raw.shutdown(socket.SHUT_RDWR)  # no close frame
    raw.close()
    wait_for(relay, lambda s: bool(disconnects(s, polite_id)) and bool(disconnects(s, abrupt_id)))
    time.sleep(0.5)

    seen = events(relay)
    assert len(disconnects(seen, polite_id)) == 1 and len(disconnects(seen, abrupt_id)) == 1
    assert all(e["in_scope"] and e["detached"] for e in disconnects(seen, polite_id) + disconnects(seen, abrupt_id))
    assert polite not in registry(relay)["machines"] and abrupt not in registry(relay)["machines"]


def test_send_json_returns_false_after_the_peer_closed(relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(relay)
    hello(ws, machine_id)
    session_id = session_of(relay, machine_id)
    send = relay.url(f"/_test/sessions/{session_id}/send")

    assert requests.post(send, json={"type": "relay.trace"}, timeout=5).json() == {"sent": True}
    ws.close()
    wait_for(relay, lambda s: bool(disconnects(s, session_id)))

    assert requests.post(send, json={"type": "relay.trace"}, timeout=5).json() == {"sent": False}


# -- the route ------------------------------------------------------------------------------------
def test_plain_http_on_agent_gets_the_fastify_404(relay: LiveRelay) -> None:
    response = requests.get(relay.url("/agent"), timeout=5)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.text == '{"message":"Route GET:/agent not found","error":"Not Found","statusCode":404}'

    posted = requests.post(relay.url("/agent?x=1"), data="{}", timeout=5)
    assert posted.status_code == 404
    assert posted.json() == {"message": "Route POST:/agent?x=1 not found", "error": "Not Found", "statusCode": 404}


@pytest.mark.parametrize("target", ["/agent/", "/agent?token=x", "/agent?", "/Agent", "/%61gent", "/agent/x"])
def test_only_the_exact_target_agent_upgrades(relay: LiveRelay, target: str) -> None:
    agent = RawAgent(relay, target=target)
    assert agent.status == 404
    assert b"101" not in agent.response.split(b"\r\n", 1)[0]
    agent.close()


def test_the_exact_target_upgrades_with_101(relay: LiveRelay) -> None:
    agent = RawAgent(relay)
    assert agent.status == 101
    agent.close()


def test_an_upgrade_without_a_key_is_refused_with_400(relay: LiveRelay) -> None:
    agent = RawAgent(relay, key="")
    assert agent.status == 400
    agent.close()


def test_permessage_deflate_is_not_negotiated(relay: LiveRelay) -> None:
    agent = RawAgent(relay, extra_headers="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")
    assert agent.status == 101
    assert b"sec-websocket-extensions" not in agent.response.lower()
    agent.close()


# -- liveness -------------------------------------------------------------------------------------
def test_the_relay_pings_connected_agents(lively_relay: LiveRelay) -> None:
    ws = connect(lively_relay)
    hello(ws, machine())
    ws.settimeout(2)

    opcode, _ = ws.recv_data(control_frame=True)

    assert opcode == websocket.ABNF.OPCODE_PING
    ws.close()


def test_a_silent_dead_peer_is_closed_after_the_idle_timeout(lively_relay: LiveRelay) -> None:
    machine_id = machine()
    agent = RawAgent(lively_relay)
    started = time.monotonic()  # the relay cannot have heard from the peer later than this
    agent.send_text(json.dumps({"type": "agent.hello", "machineId": machine_id}))
    session_id = session_of(lively_relay, machine_id)

    seen = wait_for(lively_relay, lambda s: bool(disconnects(s, session_id)), timeout_s=8)
    elapsed = time.monotonic() - started

    assert disconnects(seen, session_id), "the silent peer was never closed"
    assert 1.2 <= elapsed <= 5.0
    assert machine_id not in registry(lively_relay)["machines"]
    assert "agent socket idle for" in lively_relay.logs()
    agent.close()


def test_a_peer_answering_pings_stays_connected(lively_relay: LiveRelay) -> None:
    machine_id = machine()
    ws = connect(lively_relay)
    hello(ws, machine_id)
    session_id = session_of(lively_relay, machine_id)
    stop = threading.Event()

    def read_and_pong() -> None:  # websocket-client answers pings while it reads
        ws.settimeout(0.2)
        while not stop.is_set():
            try:
                ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                pass

    reader = threading.Thread(target=read_and_pong)
    reader.start()
    time.sleep(3.0)
    stop.set()
    reader.join()

    assert not disconnects(events(lively_relay), session_id)
    assert registry(lively_relay)["machines"].get(machine_id) == session_id
    ws.close()


def test_frames_alone_keep_a_peer_that_ignores_pings_alive(lively_relay: LiveRelay) -> None:
    machine_id = machine()
    agent = RawAgent(lively_relay)
    agent.send_text(json.dumps({"type": "agent.hello", "machineId": machine_id}))
    session_id = session_of(lively_relay, machine_id)

    for _ in range(8):
        time.sleep(0.4)
        agent.send_text(json.dumps({"type": "agent.heartbeat", "machineId": machine_id}))

    assert not disconnects(events(lively_relay), session_id)
    agent.close()


# -- shutdown and limits --------------------------------------------------------------------------
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_sigterm_closes_agents_with_1001_and_the_worker_waits_for_them(worker_class: str) -> None:
    env = {"AGENT_TEST_MAX_CONNECTIONS": "3", "RELAY_GRACEFUL_TIMEOUT_S": "20", "RELAY_WORKER_CLASS": worker_class}
    with live_relay(TEST_APP, env=env) as limited:
        # earlier agents that came and went must not upset the worker's connection count
        for _ in range(3):
            gone = connect(limited)
            hello(gone, machine())
            gone.close()
        wait_for(limited, lambda s: sum(e["event"] == "disconnect" for e in s) == 3)
        agents = [connect(limited) for _ in range(3)]
        for ws in agents:
            hello(ws, machine())

        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            connect(limited)
        assert refused.value.status_code == 503

        codes: list[Optional[int]] = []
        readers = [threading.Thread(target=lambda w=ws: codes.append(close_frame_code(w, 10))) for ws in agents]
        for reader in readers:
            reader.start()
        took = limited.stop()
        for reader in readers:
            reader.join()
        logs = limited.logs()

    assert took < 5.0
    assert codes == [1001, 1001, 1001]
    assert logs.count("agent socket closed") == 6
    assert logs.rindex("agent socket closed") < logs.index("Worker exiting")
    assert "Exception ignored" not in logs and "Traceback" not in logs


@pytest.mark.parametrize("changes", [
    {"ping_interval_s": 0},
    {"idle_timeout_s": 5.0},  # not above the ping interval: a quiet healthy agent would be cut
    {"max_message_bytes": 0},
    {"max_connections": 0},
])
def test_inconsistent_channel_settings_are_refused(changes: dict[str, Any]) -> None:
    registry = SessionRegistry()
    options: dict[str, Any] = {"ping_interval_s": 5.0, "idle_timeout_s": 30.0, "max_message_bytes": 1024}
    options.update(changes)
    handler = RecordingHandler(registry)
    with pytest.raises(ValueError):
        register_agent_channel(Flask(__name__), registry, handler, frame_scope=handler.scope, **options)
