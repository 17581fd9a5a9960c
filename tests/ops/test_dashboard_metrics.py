"""The Grafana dashboard and the alert rules only use metrics the relay exports.

A live relay in ``redis-read`` (``ratelimit`` in ``shadow``) is driven through normal traffic, a shadow
mismatch, a runtime flag change and a Redis pause long enough to open the breaker, then a recovery with
write-backs; after that its ``/metrics/prometheus`` (gunicorn, multiprocess mode, where a family only
appears once it has a value) must hold every metric the dashboard and the rules name.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import ADMIN_HEADERS, KEY_PREFIX, OpsRelay, start_ops_relay
from tests.support.redisproc import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "relay-store.json"
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
METRICS_SOURCE = ROOT / "relay" / "metrics.py"
METRIC = re.compile(r"\brelay_[a-z0-9_]+\b")
#: Sample-name suffixes and the family type they belong to.
SUFFIXES = {"_bucket": "histogram", "_count": "histogram", "_sum": "histogram", "_total": "counter"}
#: Grafana variables, replaced by values a query can run with.
VARIABLES = {"$__rate_interval": "5m", "$backend": "redis", "$domain": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    doc = dashboard()
    queries = [target["expr"] for panel in doc["panels"] for target in panel["targets"]]
    queries += [v["definition"] for v in doc["templating"]["list"] if v.get("type") == "query"]
    return queries


def family(sample: str) -> tuple[str, str]:
    """``(family name, expected type or "")`` of a sample name used in a query."""
    for suffix, kind in SUFFIXES.items():
        if sample.endswith(suffix):
            return sample[: -len(suffix)], kind
    return sample, ""


def referenced() -> dict[str, str]:
    names = {name for text in [*dashboard_queries(), RULES.read_text()] for name in METRIC.findall(text)}
    return dict(family(name) for name in sorted(names))


@pytest.fixture(scope="module")
def exposition(redis_session: RedisServer) -> Iterator[dict[str, str]]:
    """Family name → type, as a live relay exports them after traffic, faults and recovery."""
    env = {"STORE_RATELIMIT_PHASE": "shadow", "REDIS_SOCKET_TIMEOUT_MS": "100", "REDIS_CONNECT_TIMEOUT_MS": "100",
           "REDIS_OP_DEADLINE_MS": "400", "REDIS_BREAKER_FAIL_MAX": "3", "REDIS_BREAKER_RESET_TIMEOUT_MS": "300"}
    with start_ops_relay(redis_session, phase="redis-read", **env) as ops:
        ids = ops.traffic(5)
        _tamper(ops, ids[0])
        ops.get(f"/commands/{ids[0]}")
        ops.put_flags({"STORE_LOCALE_SHADOW_SAMPLE_RATE": "0.5"})
        _outage(ops)
        reply = requests.get(ops.relay.url("/metrics/prometheus"), headers=ADMIN_HEADERS, timeout=10)
        reply.raise_for_status()
        yield {f.name: f.type for f in text_string_to_metric_families(reply.text) if f.samples}


def _tamper(ops: OpsRelay, command_id: str) -> None:
    """Change an audit record in Redis behind the relay's back: the next shadow read differs."""
    key = f"{KEY_PREFIX}:{{audit}}:{command_id}"
    record = json.loads(ops.redis_value(key))
    record["data"]["summary"] = "changed behind the relay's back"
    redis = ops.redis.client()
    redis.set(key, json.dumps(record))
    redis.close()


def _outage(ops: OpsRelay) -> None:
    """Pause Redis for a few callbacks (timeouts, retries, fallbacks, breaker), then recover."""
    ops.redis.pause()
    try:
        for _ in range(3):
            ops.callback()
    finally:
        ops.redis.resume()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.4)
        ops.callback()
        domains = ops.get("/ops/store")["domains"]
        if all(d["breaker"] == "closed" and d["pendingWriteBack"] == 0 and d["counts"]["writeBack"]
               for name, d in domains.items() if name in ("idempotency", "audit")):
            return
    raise AssertionError(f"no recovery within 15 s: {ops.get('/ops/store')['domains']['audit']}")


def test_the_dashboard_and_rules_reference_only_metrics_defined_by_the_relay() -> None:
    defined = set(re.findall(r'"(relay_[a-z0-9_]+)"', METRICS_SOURCE.read_text()))

    assert referenced(), "no metric found in the dashboard or the rules"
    assert set(referenced()) <= defined, sorted(set(referenced()) - defined)


def test_every_referenced_metric_is_exported_by_a_live_relay(exposition: dict[str, str]) -> None:
    missing = {name: kind for name, kind in referenced().items() if name not in exposition}
    wrong_type = {name: (kind, exposition[name]) for name, kind in referenced().items()
                  if name in exposition and kind and exposition[name] != kind}

    assert not missing, f"referenced but not exported: {missing}"
    assert not wrong_type, wrong_type


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `make promtool` installs Debian's prometheus package"
    rules = ["groups:", "  - name: dashboard-queries", "    rules:"]
    for n, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            query = query[len("label_values("):].split(",")[0]
        for variable, value in VARIABLES.items():
            query = query.replace(variable, value)
        rules += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(query)}"]
    (tmp_path / "queries.yml").write_text("\n".join(rules) + "\n")

    result = subprocess.run([binary, "check", "rules", "queries.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_what_the_runbook_relies_on() -> None:
    doc = dashboard()
    titles = " | ".join(panel["title"].lower() for panel in doc["panels"])
    ids = [panel["id"] for panel in doc["panels"]]

    assert len(ids) == len(set(ids))
    assert all(panel["targets"] and panel["datasource"]["uid"] == "${datasource}" for panel in doc["panels"])
    for topic in ("phase", "breaker", "latency p50", "latency p95", "latency p99", "error rate", "timeout rate",
                  "fallback rate", "mismatch rate", "key cardinality"):
        assert topic in titles, topic
