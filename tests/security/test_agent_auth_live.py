"""Agent authentication on a live relay (docs/security.md): a shared token and per-machine tokens, in
the hello frame or the upgrade's ``Authorization`` header; a refused hello is closed with 4401 and
never registers; a socket speaks only for the machine it said hello as; tokens are never logged."""
from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import websocket

from tests.cluster.harness import wait_for
from tests.support.live_relay import LiveRelay, live_relay

ADMIN = {"x-admin-token": "agent-auth-admin"}
SHARED = "shared-agent-token-7f3a"
SPECIAL = "special-agent-token-91c2"
WRONG = "wrong-agent-token-0b5d"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRelay]:
    env = {"AGENT_AUTH_TOKEN": SHARED, "AGENT_TOKENS": f"special-box:{SPECIAL}", "RELAY_ADMIN_TOKEN": "agent-auth-admin",
           "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path_factory.mktemp("audit") / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as live:
        yield live


def connect(relay: LiveRelay, bearer: Optional[str] = None) -> websocket.WebSocket:
    header = [f"Authorization: Bearer {bearer}"] if bearer else []
    return websocket.create_connection(relay.agent_url, timeout=5, header=header)


def hello(ws: websocket.WebSocket, machine_id: str, token: Optional[str] = None) -> None:
    frame: dict[str, Any] = {"type": "agent.hello", "machineId": machine_id, "version": "auth-test"}
    if token is not None:
        frame["token"] = token
    ws.send(json.dumps(frame))


def close_code(ws: websocket.WebSocket, wait_s: float = 2.0) -> Optional[int]:
    """The close code the relay sent, or ``None`` when the socket stays open for ``wait_s``."""
    ws.settimeout(wait_s)
    try:
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
    except websocket.WebSocketTimeoutException:
        return None
    except (websocket.WebSocketConnectionClosedException, OSError):
        return None


def machines(relay: LiveRelay) -> set[str]:
    reply = requests.get(relay.url("/machines"), headers=ADMIN, timeout=5)
    return {m["machineId"] for m in reply.json()["items"]}


@pytest.mark.parametrize(("machine_id", "frame_token", "bearer"), [
    ("box-frame", SHARED, None),
    ("box-header", None, SHARED),
    ("special-box", SPECIAL, None),
])
def test_a_valid_token_registers_the_machine(relay: LiveRelay, machine_id: str, frame_token: Optional[str],
                                             bearer: Optional[str]) -> None:
    ws = connect(relay, bearer)
    try:
        hello(ws, machine_id, frame_token)
        assert wait_for(lambda: machine_id in machines(relay), timeout_s=5)
        assert close_code(ws, wait_s=0.3) is None
    finally:
        ws.close()


@pytest.mark.parametrize(("machine_id", "frame_token", "bearer"), [
    ("box-none", None, None),
    ("box-wrong", WRONG, None),
    ("box-wrong-header", None, WRONG),
    ("special-box", SHARED, None),  # a machine with its own token may not use the shared one
])
def test_a_hello_without_a_valid_token_is_closed_with_4401(relay: LiveRelay, machine_id: str,
                                                           frame_token: Optional[str], bearer: Optional[str]) -> None:
    ws = connect(relay, bearer)
    try:
        hello(ws, machine_id, frame_token)
        assert close_code(ws) == 4401
    finally:
        ws.close()
    if machine_id != "special-box":
        assert machine_id not in machines(relay)


def test_the_query_string_does_not_carry_tokens(relay: LiveRelay) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"{relay.agent_url}?token={SHARED}", timeout=5)


def test_a_socket_speaks_only_for_its_own_machine(relay: LiveRelay) -> None:
    victim, intruder = connect(relay), connect(relay)
    try:
        hello(victim, "victim-box", SHARED)
        hello(intruder, "intruder-box", SHARED)
        assert wait_for(lambda: {"victim-box", "intruder-box"} <= machines(relay), timeout_s=5)
        reply = requests.post(relay.url("/wecom/callback"), timeout=5, json={
            "msgId": "spoof-1", "userId": "u1", "machineId": "victim-box", "text": "@dev task secret work"})
        command_id = reply.json()["commandId"]
        for claimed in ("victim-box", "intruder-box"):  # naming the victim, or itself
            intruder.send(json.dumps({"type": "agent.result", "result": {
                "commandId": command_id, "machineId": claimed, "status": "ok", "summary": "forged"}}))
        time.sleep(0.5)
        record = requests.get(relay.url(f"/commands/{command_id}"), headers=ADMIN, timeout=5).json()
        assert record["status"] == "sent_to_agent"
        assert command_id in {i["commandId"] for i in
                              requests.get(relay.url("/inflight"), headers=ADMIN, timeout=5).json()["items"]}
    finally:
        victim.close()
        intruder.close()


def test_tokens_never_reach_the_logs(relay: LiveRelay) -> None:
    ws = connect(relay, WRONG)
    hello(ws, "box-logged", WRONG)
    close_code(ws)
    ws.close()
    logs = relay.logs()
    assert "agent_auth_failed" in logs
    for token in (SHARED, SPECIAL, WRONG):
        assert token not in logs
    config = requests.get(relay.url("/ops/config"), headers=ADMIN, timeout=5).text
    assert SHARED not in config and SPECIAL not in config


def test_an_unconfigured_relay_accepts_agents_without_tokens(tmp_path: Path) -> None:
    env = {"RELAY_ADMIN_TOKEN": "agent-auth-admin", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as open_relay:
        ws = connect(open_relay)
        try:
            hello(ws, "legacy-box")
            assert wait_for(lambda: "legacy-box" in machines(open_relay), timeout_s=5)
        finally:
            ws.close()
        assert "agent_auth_off" in open_relay.logs()
