"""Live: a relay under gunicorn reaches Redis through a Unix socket (``REDIS_URL=unix://...``)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.support.live_relay import live_relay
from tests.support.one_command import serve_one_command
from tests.support.redisproc import RedisServer

ADMIN = {"x-admin-token": "unix-admin"}


def test_a_unix_socket_redis_url_serves_callbacks_and_results(unix_redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    env = {"REDIS_URL": unix_redis_server.unix_url, "STORE_PHASE": "redis-primary", "RELAY_ADMIN_TOKEN": "unix-admin",
           "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as relay:
        reply, store = serve_one_command(relay, "unix-box", "unix-1", ADMIN)
    assert store["degraded"] is False and store["redis"]["reachable"] is True
    with unix_redis_server.client() as direct:
        assert direct.exists("codexbridge:dev:idempotency:unix-1")
        stored = json.loads(direct.get(f"codexbridge:dev:{{audit}}:{reply['commandId']}"))
    assert [e["status"] for e in stored["data"]["events"]] == ["created", "sent_to_agent", "agent_ok"]
