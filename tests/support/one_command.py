"""One command through a live relay: an agent says hello, a callback is dispatched to it, the agent
answers, and the relay audits the answer. For live tests that need the whole path once."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import requests
import websocket

from tests.cluster.harness import wait_for
from tests.support.live_relay import LiveRelay


def serve_one_command(relay: LiveRelay, machine_id: str, msg_id: str,
                      admin: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The callback's reply and ``/ops/store`` once the agent's result is audited (``agent_ok``)."""
    ws = websocket.create_connection(relay.agent_url, timeout=5)
    try:
        ws.send(json.dumps({"type": "agent.hello", "machineId": machine_id}))
        assert wait_for(lambda: requests.get(relay.url("/machines"), headers=admin, timeout=5).json()["items"])
        reply = requests.post(relay.url("/wecom/callback"), timeout=5, json={
            "msgId": msg_id, "userId": "u1", "machineId": machine_id, "text": "@dev status"}).json()
        assert reply["status"] == "sent_to_agent"
        ws.send(json.dumps({"type": "agent.result", "result": {
            "commandId": reply["commandId"], "machineId": machine_id, "status": "ok", "summary": "fine"}}))
        assert wait_for(lambda: requests.get(relay.url(f"/commands/{reply['commandId']}"), headers=admin,
                                             timeout=5).json().get("status") == "agent_ok")
        return reply, requests.get(relay.url("/ops/store"), headers=admin, timeout=5).json()
    finally:
        ws.close()
