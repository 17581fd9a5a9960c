"""Live: a relay under gunicorn reaches Redis through a Unix socket (``REDIS_URL=unix://...``)."""
from __future__ import annotations

import json
from pathlib import Path

import requests
import websocket

from tests.cluster.harness import wait_for
from tests.support.live_relay import live_relay
from tests.support.redisproc import RedisServer

ADMIN = {"x-admin-token": "unix-admin"}


def test_a_unix_socket_redis_url_serves_callbacks_and_results(unix_redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    env = {"REDIS_URL": unix_redis_server.unix_url, "STORE_PHASE": "redis-primary", "RELAY_ADMIN_TOKEN": "unix-admin",
           "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as relay:
        ws = websocket.create_connection(relay.agent_url, timeout=5)
        try:
            ws.send(json.dumps({"type": "agent.hello", "machineId": "unix-box"}))
            assert wait_for(lambda: requests.get(relay.url("/machines"), headers=ADMIN, timeout=5).json()["items"])
            reply = requests.post(relay.url("/wecom/callback"), timeout=5, json={
                "msgId": "unix-1", "userId": "u1", "machineId": "unix-box", "text": "@dev status"}).json()
            assert reply["status"] == "sent_to_agent"
            ws.send(json.dumps({"type": "agent.result", "result": {
                "commandId": reply["commandId"], "machineId": "unix-box", "status": "ok", "summary": "fine"}}))
            assert wait_for(lambda: requests.get(relay.url(f"/commands/{reply['commandId']}"), headers=ADMIN,
                                                 timeout=5).json().get("status") == "agent_ok")
            store = requests.get(relay.url("/ops/store"), headers=ADMIN, timeout=5).json()
        finally:
            ws.close()
    assert store["degraded"] is False and store["redis"]["reachable"] is True
    with unix_redis_server.client() as direct:
        assert direct.exists("codexbridge:dev:idempotency:unix-1")
        stored = json.loads(direct.get(f"codexbridge:dev:{{audit}}:{reply['commandId']}"))
    assert [e["status"] for e in stored["data"]["events"]] == ["created", "sent_to_agent", "agent_ok"]
