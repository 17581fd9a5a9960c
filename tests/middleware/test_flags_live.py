"""A flag change reaches every gunicorn worker within 5 seconds (two workers, Redis mode)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from tests.support.live_relay import LiveRelay, live_relay
from tests.support.redisproc import RedisServer

ADMIN = "flags-live-admin"
AUTH = {"x-admin-token": ADMIN}
DEADLINE_S = 5.0


def ops_store(relay: LiveRelay) -> dict[str, Any]:
    """One ``GET /ops/store`` on a new connection, so either worker may answer."""
    reply = requests.get(relay.url("/ops/store"), headers={**AUTH, "Connection": "close"}, timeout=5)
    assert reply.status_code == 200
    return reply.json()


def seconds_until_every_worker_runs(relay: LiveRelay, phase: str, workers: set[int]) -> float:
    """Poll ``/ops/store`` until the latest answer of every worker shows ``phase`` in every domain."""
    started = time.monotonic()
    latest: dict[int, set[str]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        while True:
            for body in pool.map(lambda _: ops_store(relay), range(8)):
                latest[body["pid"]] = {d["flags"]["phase"] for d in body["domains"].values()}
            elapsed = time.monotonic() - started
            if set(latest) == workers and all(phases == {phase} for phases in latest.values()):
                return elapsed
            assert elapsed < DEADLINE_S, f"after {elapsed:.1f} s the workers run {latest}"
            time.sleep(0.05)


def test_every_worker_applies_a_put_within_five_seconds(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"STORE_BACKEND": "redis", "REDIS_URL": redis_server.url, "RELAY_WORKERS": "2", "RELAY_CONNECTIONS": "16",
           "RELAY_ADMIN_TOKEN": ADMIN, "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as relay:
        workers = set(relay.worker_pids())
        assert len(workers) == 2
        assert seconds_until_every_worker_runs(relay, "redis-primary", workers) < DEADLINE_S
        for phase in ("redis-read", "rampdown", "redis-primary"):
            reply = requests.put(relay.url("/ops/store/flags"), headers=AUTH, json={"STORE_PHASE": phase}, timeout=5)
            assert reply.status_code == 200 and reply.json()["persisted"] is True
            assert seconds_until_every_worker_runs(relay, phase, workers) < DEADLINE_S

        refused = requests.put(relay.url("/ops/store/flags"), headers=AUTH, json={"STORE_PHASE": "shadow"}, timeout=5)
        assert refused.status_code == 400 and "RELAY_WORKERS=1" in refused.json()["details"]["STORE_PHASE"]


def test_workers_given_on_the_command_line_also_refuse_memory_authority_at_runtime(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"STORE_BACKEND": "redis", "REDIS_URL": redis_server.url, "RELAY_WORKERS": "1", "RELAY_CONNECTIONS": "16",
           "RELAY_ADMIN_TOKEN": ADMIN, "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env, extra_args=("-w", "2")) as relay:
        deadline = time.monotonic() + 15
        while len(relay.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(relay.worker_pids()) == 2
        refused = requests.put(relay.url("/ops/store/flags"), headers=AUTH, json={"STORE_PHASE": "shadow"}, timeout=5)
        assert refused.status_code == 400 and "RELAY_WORKERS=1" in refused.json()["details"]["STORE_PHASE"]
