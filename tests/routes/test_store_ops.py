"""``/ops/store``, ``PUT /ops/store/flags`` and ``/ops/store/mismatches`` on the real ``create_app``."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from config.settings import load_settings
from relay.app import DOMAINS, create_app
from tests.support.redisproc import RedisServer

ADMIN = "store-ops-admin"
AUTH = {"x-admin-token": ADMIN}

AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app() -> Iterator[AppFactory]:
    apps: list[Flask] = []

    def make(**env: str) -> Flask:
        settings = load_settings({"RELAY_ADMIN_TOKEN": ADMIN, "AUDIT_LOG_PATH": "", **env})
        apps.append(create_app(settings, start_background=False))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["relay"].close()


def status(client: FlaskClient) -> dict[str, Any]:
    reply = client.get("/ops/store", headers=AUTH)
    assert reply.status_code == 200
    return reply.get_json()


@pytest.mark.parametrize("method, path", [
    ("GET", "/ops/store"), ("PUT", "/ops/store/flags"), ("GET", "/ops/store/mismatches"),
])
def test_store_routes_need_the_admin_token(make_app: AppFactory, method: str, path: str) -> None:
    client = make_app().test_client()
    for headers in ({}, {"x-admin-token": "wrong"}):
        reply = client.open(path, method=method, headers=headers, json={"STORE_SHADOW_SAMPLE_RATE": "0.5"})
        assert reply.status_code == 401
        assert reply.get_json() == {"error": "unauthorized_admin_request"}
    assert make_app().extensions["relay"].router.plans["audit"].shadow_sample_rate == 1.0


def test_ops_store_reports_every_domain_with_counts(make_app: AppFactory) -> None:
    app = make_app()
    relay = app.extensions["relay"]
    relay.router.store("locale").set("u1", {"locale": "en"})
    relay.router.store("locale").get("u1")

    body = status(app.test_client())

    assert body["pid"] == os.getpid()
    assert body["flags"]["source"] == "environment" and body["flags"]["overrides"] == {}
    assert set(body["domains"]) == set(DOMAINS)
    locale = body["domains"]["locale"]
    assert locale["flags"]["phase"] == "memory" and locale["breaker"] is None
    assert locale["counts"]["operations"] == {"memory": {"ok": 2}}
    assert locale["counts"]["fallbacks"] == {"read": 0, "write": 0}
    assert body["domains"]["audit"]["counts"]["ok"] == 0


def test_put_flags_changes_the_phase_in_force(make_app: AppFactory, redis_server: RedisServer) -> None:
    client = make_app(REDIS_URL=redis_server.url, STORE_PHASE="redis-primary").test_client()

    reply = client.put("/ops/store/flags", headers=AUTH, json={"STORE_AUDIT_PHASE": "redis-read"})

    assert reply.status_code == 200
    result = reply.get_json()
    assert result["persisted"] is True and result["failed"] == []
    assert result["channels"] == {"redis": "written", "file": "not_configured"}
    assert result["overrides"] == {"STORE_AUDIT_PHASE": "redis-read"} and result["version"] == 1
    assert set(result["changed"]) == {"audit"}
    assert (result["changed"]["audit"]["old"]["phase"], result["changed"]["audit"]["new"]["phase"]) == (
        "redis-primary", "redis-read")
    body = status(client)
    assert body["domains"]["audit"]["flags"]["phase"] == "redis-read"
    assert body["domains"]["locale"]["flags"]["phase"] == "redis-primary"
    assert body["domains"]["audit"]["breaker"] == "closed"
    assert (body["flags"]["source"], body["flags"]["version"]) == ("redis", 1)


@pytest.mark.parametrize("body, named", [
    ({"STORE_AUDIT_SHADOW_SAMPLE_RATE": "2"}, "STORE_AUDIT_SHADOW_SAMPLE_RATE"),
    ({"STORE_PHASE": "redis-read"}, "REDIS_URL"),
    ({"STORE_PHASE": "shadow", "STORE_PHASES": "shadow"}, "STORE_PHASES"),
    ([], "body"),
])
def test_put_flags_refuses_bad_values_naming_them(make_app: AppFactory, body: Any, named: str) -> None:
    client = make_app().test_client()
    reply = client.put("/ops/store/flags", headers=AUTH, json=body)
    assert reply.status_code == 400
    error = reply.get_json()
    assert error["error"] == "invalid_store_flags" and named in error["details"]
    assert {d["flags"]["phase"] for d in status(client)["domains"].values()} == {"memory"}
    assert status(client)["flags"]["changes"] == 0


def test_put_flags_lists_the_accepted_names_for_an_unknown_one(make_app: AppFactory) -> None:
    reply = make_app().test_client().put("/ops/store/flags", headers=AUTH, json={"STORE_FOO": "1"})
    assert reply.status_code == 400
    assert "STORE_AUDIT_PHASE" in reply.get_json()["accepted"]


def test_put_flags_without_a_channel_says_it_was_not_persisted(make_app: AppFactory) -> None:
    client = make_app().test_client()
    reply = client.put("/ops/store/flags", headers=AUTH, json={"STORE_SHADOW_SAMPLE_RATE": 0.5})
    assert reply.status_code == 200 and reply.get_json()["persisted"] is False
    assert status(client)["domains"]["inflight"]["flags"]["shadowSampleRate"] == 0.5


def test_put_flags_needs_a_json_body(make_app: AppFactory) -> None:
    reply = make_app().test_client().put("/ops/store/flags", headers=AUTH, data="{oops",
                                         content_type="application/json")
    assert reply.status_code == 400


def test_mismatches_show_the_redacted_shadow_sample(make_app: AppFactory, redis_server: RedisServer) -> None:
    app = make_app(REDIS_URL=redis_server.url, STORE_PHASE="shadow")
    relay = app.extensions["relay"]
    client = app.test_client()
    assert client.get("/ops/store/mismatches", headers=AUTH).get_json() == {"items": []}

    store = relay.router.store("locale")
    relay.router.backends["memory"].set(store.key("u1"), store.encode({"locale": "en"}))
    relay.router.shadow.start()
    assert store.get("u1") == {"locale": "en"}
    relay.router.shadow.drain()

    items = client.get("/ops/store/mismatches", headers=AUTH).get_json()["items"]
    assert [(i["domain"], i["op"], i["outcome"]) for i in items] == [("locale", "get", "missing")]
    assert items[0]["key"].startswith("sha256:") and "u1" not in items[0]["key"]
    assert status(client)["domains"]["locale"]["shadow"] == {"missing": 1}
