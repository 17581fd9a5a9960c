"""``/ops/store/reconcile/<domain>`` and ``/ops/store/inventory`` on the real ``create_app`` (one process)."""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from config.settings import load_settings
from relay.app import create_app
from tests.support.redisproc import RedisServer

ADMIN = "tools-admin-token"
HEADERS = {"x-admin-token": ADMIN}
PREFIX = "codexbridge:dev"


def make_app(tmp_path: Path, **env: str) -> Flask:
    settings = load_settings({"RELAY_ADMIN_TOKEN": ADMIN, "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": "",
                              "REDIS_SOCKET_TIMEOUT_MS": "100", "REDIS_CONNECT_TIMEOUT_MS": "100",
                              "REDIS_MAX_RETRIES": "0", **env})
    return create_app(settings, start_background=False)


@pytest.fixture
def app(tmp_path: Path, redis_server: RedisServer) -> Iterator[Flask]:
    app = make_app(tmp_path, REDIS_URL=redis_server.url, STORE_PHASE="shadow")
    yield app
    app.extensions["relay"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    for _ in range(3):
        reply = app.test_client().post("/wecom/callback", json={"msgId": uuid.uuid4().hex, "userId": "u1",
                                                                "text": "@dev status", "machineId": "m1"})
        assert reply.status_code == 200
    return app.test_client()


def reconcile(client: FlaskClient, domain: str, **query: str) -> Any:
    reply = client.get(f"/ops/store/reconcile/{domain}", query_string=query, headers=HEADERS)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return reply.get_json()


@pytest.mark.parametrize("path", ["/ops/store/reconcile/audit", "/ops/store/inventory"])
def test_the_tools_are_admin_only(client: FlaskClient, path: str) -> None:
    reply = client.get(path)

    assert reply.status_code == 401
    assert reply.get_json() == {"error": "unauthorized_admin_request"}


@pytest.mark.parametrize(("path", "status", "error"), [
    ("/ops/store/reconcile/nope", 404, "unknown_domain"),
    ("/ops/store/reconcile/audit?limit=0", 400, "invalid_limit"),
    ("/ops/store/reconcile/audit?repair=yes", 400, "invalid_repair"),
    ("/ops/store/inventory?sample=-1", 400, "invalid_sample"),
])
def test_bad_requests_are_refused_by_name(client: FlaskClient, path: str, status: int, error: str) -> None:
    reply = client.get(path, headers=HEADERS)

    assert reply.status_code == status
    assert reply.get_json() == {"error": error}


def test_a_consistent_domain_reconciles_clean(client: FlaskClient) -> None:
    report = reconcile(client, "audit")

    assert report["authoritative"] == "memory" and report["other"] == "redis"
    assert report["keys"] == 4 and report["match"] == 4 and report["differences"] == []


def test_index_members_missing_in_redis_are_merged_back(client: FlaskClient, redis_server: RedisServer) -> None:
    redis = redis_server.client()
    index = f"{PREFIX}:{{audit}}:#updated"
    member = str(redis.zrange(index, 0, 0)[0])
    redis.zrem(index, member)

    found = reconcile(client, "audit")
    repaired = reconcile(client, "audit", repair="1")

    assert found["different"] == 1
    assert found["differences"][0]["kind"] == "index" and found["differences"][0]["fields"] == ["members"]
    assert repaired["repaired"]["written"] == 1 and repaired["remaining"] == 0
    assert redis.zscore(index, member) is not None
    redis.close()


def test_counters_and_locks_are_skipped(client: FlaskClient, redis_server: RedisServer, app: Flask) -> None:
    relay = app.extensions["relay"]
    with relay.router.bound():
        relay.router.store("templates").acquire_lock("sweep", "token", 60_000)

    ratelimit = reconcile(client, "ratelimit")
    templates = reconcile(client, "templates")

    assert ratelimit["keys"] == 1 and ratelimit["skipped"] == 1 and ratelimit["compared"] == 0
    assert templates["skipped"] == 1 and templates["match"] == templates["compared"] == 4


def test_progress_streams_ndjson_ending_with_the_result(client: FlaskClient) -> None:
    reply = client.get("/ops/store/reconcile/idempotency?progress=1", headers=HEADERS)

    lines = [json.loads(line) for line in reply.get_data(as_text=True).splitlines()]
    assert reply.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert lines[0] == {"progress": {"stage": "compare", "done": 3, "total": 3}}
    assert lines[-1]["result"]["match"] == 3


def test_inventory_counts_both_backends(client: FlaskClient) -> None:
    reply = client.get("/ops/store/inventory?sample=2", headers=HEADERS)

    inventory = reply.get_json()
    idempotency = inventory["domains"]["idempotency"]
    assert idempotency["phase"] == "shadow" and idempotency["authoritative"] == "memory"
    assert idempotency["backends"]["memory"]["keys"] == idempotency["backends"]["redis"]["keys"] == 3
    assert idempotency["backends"]["redis"]["sampled"] == 2
    assert inventory["totals"]["memory"]["keys"] == inventory["totals"]["redis"]["keys"]


def test_with_redis_down_reconcile_is_503_and_inventory_still_counts_memory(
        client: FlaskClient, redis_server: RedisServer) -> None:
    redis_server.stop()

    reconciled = client.get("/ops/store/reconcile/audit", headers=HEADERS)
    inventory = client.get("/ops/store/inventory", headers=HEADERS).get_json()

    assert reconciled.status_code == 503 and reconciled.get_json() == {"error": "store_unavailable"}
    assert inventory["domains"]["audit"]["backends"]["redis"]["error"] == "store_unavailable"
    assert inventory["domains"]["audit"]["backends"]["memory"]["keys"] == 4
    assert "redis" not in inventory["totals"]


def test_a_relay_without_redis_has_nothing_to_reconcile(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    try:
        client = app.test_client()
        reconciled = client.get("/ops/store/reconcile/audit", headers=HEADERS)
        inventory = client.get("/ops/store/inventory", headers=HEADERS).get_json()
    finally:
        app.extensions["relay"].close()

    assert reconciled.status_code == 409 and reconciled.get_json() == {"error": "redis_not_configured"}
    assert set(inventory["domains"]["audit"]["backends"]) == {"memory"}
