"""Live: under gunicorn's gevent worker the relay's round trips go over the shared connection
(``REDIS_MULTIPLEX``, on by default), and ``/ops/store`` says so; off, each takes a pooled one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import websocket

from tests.cluster.harness import wait_for
from tests.support.live_relay import live_relay
from tests.support.redisproc import RedisServer

ADMIN = {"x-admin-token": "multiplex-admin"}


def _serve_one_command(relay: Any) -> dict[str, Any]:
    """A callback answered by an agent and audited; ``/ops/store`` afterwards."""
    ws = websocket.create_connection(relay.agent_url, timeout=5)
    try:
        ws.send(json.dumps({"type": "agent.hello", "machineId": "shared-box"}))
        assert wait_for(lambda: requests.get(relay.url("/machines"), headers=ADMIN, timeout=5).json()["items"])
        reply = requests.post(relay.url("/wecom/callback"), timeout=5, json={
            "msgId": "shared-1", "userId": "u1", "machineId": "shared-box", "text": "@dev status"}).json()
        assert reply["status"] == "sent_to_agent"
        ws.send(json.dumps({"type": "agent.result", "result": {
            "commandId": reply["commandId"], "machineId": "shared-box", "status": "ok", "summary": "fine"}}))
        assert wait_for(lambda: requests.get(relay.url(f"/commands/{reply['commandId']}"), headers=ADMIN,
                                             timeout=5).json().get("status") == "agent_ok")
        return requests.get(relay.url("/ops/store"), headers=ADMIN, timeout=5).json()
    finally:
        ws.close()


@pytest.mark.parametrize("setting, shared", [(None, True), ("false", False)])
def test_the_worker_s_round_trips_share_one_connection_unless_turned_off(
        redis_server: RedisServer, tmp_path: Path, setting: Optional[str], shared: bool) -> None:
    env = {"REDIS_URL": redis_server.url, "STORE_PHASE": "redis-primary", "RELAY_ADMIN_TOKEN": "multiplex-admin",
           "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"),
           **({"REDIS_MULTIPLEX": setting} if setting else {})}
    with live_relay("wsgi:app", env=env) as relay:
        store = _serve_one_command(relay)
    counts = store["redis"]["sharedConnection"]
    if shared:
        # At least the callback's two round trips and the result's three.
        assert counts is not None and counts["roundTrips"] >= 5 and 1 <= counts["writes"] <= counts["roundTrips"]
    else:
        assert counts is None
