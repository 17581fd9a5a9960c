"""``GET /metrics/prometheus`` on the real ``create_app`` (memory stores, one process)."""
from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from relay.app import create_app
from relay.domains import audit

ADMIN = "metrics-admin-token"


class FakeAgent:
    def __init__(self) -> None:
        self.session_id = str(uuid.uuid4())
        self.machine_id = None

    def send_json(self, frame: dict[str, Any]) -> bool:
        return True

    def close(self, reason: str = "") -> None:
        """Nothing to close."""


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    settings = load_settings({"RELAY_ADMIN_TOKEN": ADMIN, "ALLOWLIST_USERS": "u1",
                              "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")})
    app = create_app(settings, start_background=False)
    yield app
    app.extensions["relay"].close()


@pytest.fixture
def client(app: Any) -> FlaskClient:
    return app.test_client()


def scrape(client: FlaskClient) -> dict[str, Any]:
    reply = client.get("/metrics/prometheus", headers={"x-admin-token": ADMIN})
    assert reply.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(reply.get_data(as_text=True))}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` of ``family`` whose labels include ``labels``."""
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("headers", [{}, {"x-admin-token": "wrong"}])
def test_the_exposition_is_admin_only(client: FlaskClient, headers: dict[str, str]) -> None:
    reply = client.get("/metrics/prometheus", headers=headers)

    assert reply.status_code == 401
    assert reply.get_json() == {"error": "unauthorized_admin_request"}


def test_the_exposition_is_prometheus_text_with_the_store_families(client: FlaskClient) -> None:
    reply = client.get("/metrics/prometheus", headers={"x-admin-token": ADMIN})

    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = {f.name: f.type for f in text_string_to_metric_families(reply.get_data(as_text=True))}
    assert families["relay_store_operation_seconds"] == "histogram"
    for counter in ("relay_store_errors", "relay_store_timeouts", "relay_store_fallbacks",
                    "relay_store_shadow_comparisons", "relay_store_breaker_transitions"):
        assert families[counter] == "counter"
    for gauge in ("relay_store_breaker_state", "relay_store_keys", "relay_store_phase", "relay_store_flag"):
        assert families[gauge] == "gauge"


def test_a_callback_shows_up_as_store_operations(client: FlaskClient) -> None:
    before = scrape(client)
    reply = client.post("/wecom/callback", json={"msgId": uuid.uuid4().hex, "userId": "u1",
                                                 "text": "@dev status", "machineId": "m1"})
    assert reply.status_code == 200

    after = scrape(client)

    count = "relay_store_operation_seconds_count"
    for domain, op in (("ratelimit", "incr"), ("idempotency", "set_if_absent"), ("audit", "set")):
        labels = {"backend": "memory", "domain": domain, "op": op, "outcome": "ok"}
        grown = (sample(after, "relay_store_operation_seconds", count, **labels)
                 - sample(before, "relay_store_operation_seconds", count, **labels))
        assert grown >= 1, (domain, op)


def test_key_counts_follow_the_stores(app: Any, client: FlaskClient) -> None:
    relay = app.extensions["relay"]
    with relay.router.bound():
        relay.agent_events.on_hello(FakeAgent(), {"type": "agent.hello", "machineId": "m1"})
    client.post("/wecom/callback", json={"msgId": uuid.uuid4().hex, "userId": "u1", "text": "@dev status",
                                         "machineId": "m1"})

    families = scrape(client)

    def keys(domain: str) -> float:
        return sample(families, "relay_store_keys", "relay_store_keys", domain=domain, backend="memory")

    assert keys("machines") == 1
    assert keys("inflight") == 1
    assert keys("audit") == 1
    assert keys("templates") == 1
    assert keys("idempotency") == 1
    assert keys("ratelimit") == 1


def test_phases_in_force_are_exposed(client: FlaskClient) -> None:
    families = scrape(client)

    assert sample(families, "relay_store_phase", "relay_store_phase", domain="machines", phase="memory") == 1
    assert sample(families, "relay_store_phase", "relay_store_phase", domain="machines", phase="shadow") == 0


def test_the_audit_linking_watermark_s_distance_to_the_clock_is_exposed(tmp_path: Path) -> None:
    now = [1_795_000_000_000]
    settings = load_settings({"RELAY_ADMIN_TOKEN": ADMIN, "ALLOWLIST_USERS": "u1",
                              "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")})
    app = create_app(settings, clock=lambda: now[0], start_background=False)
    try:
        client, relay = app.test_client(), app.extensions["relay"]

        def behind() -> float:
            family = "relay_audit_link_behind_seconds"
            return sample(scrape(client), family, family)

        assert math.isnan(behind())  # nothing linked yet: every record is read
        client.post("/wecom/callback", json={"msgId": uuid.uuid4().hex, "userId": "u1", "text": "@dev status",
                                             "machineId": "m1"})
        with relay.router.bound():
            relay.agent_events.ctx.domains.audit.link(now[0])
        assert behind() == audit.LINK_LAG_MS / 1000  # linked up to the lag the leader keeps
        now[0] += 90_000  # no pass for a minute and a half
        assert behind() == 90 + audit.LINK_LAG_MS / 1000
    finally:
        app.extensions["relay"].close()
