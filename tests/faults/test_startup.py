"""Redis unavailable when the relay starts (docs/failure-modes.md, "Redis down at startup")."""
from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from tests.cluster.harness import wait_for
from tests.faults.conftest import Figures
from tests.faults.harness import (
    agent_and_traffic,
    ADMIN,
    admin_get,
    assert_retries_processed,
    check_invariants,
    command_record,
    faulty_relay,
    inflight_ids,
    store_status,
)
from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer


def degraded(relay: object) -> tuple[bool, bool]:
    """``degraded`` as ``/ops/store`` and the reference's ``/metrics`` report it."""
    store = store_status(relay)  # type: ignore[arg-type]
    metrics = admin_get(relay, "/metrics").json()  # type: ignore[arg-type]
    return store["degraded"], metrics["store"]["degraded"]


def test_with_fallback_it_serves_from_memory_then_returns_to_redis_by_itself(
        proxy: FaultProxy, redis_server: RedisServer, tmp_path: Path, figures: Figures) -> None:
    proxy.refuse()
    with faulty_relay(proxy, tmp_path, "redis-read") as relay:
        workers = relay.worker_pids()
        with agent_and_traffic(relay, warm_up=0) as (agent, traffic):
            traffic.mark("fault")
            assert traffic.wait_for_more(20)
            assert wait_for(lambda: degraded(relay) == (True, True), timeout_s=5)
            # A command accepted during the outage whose result only arrives after Redis is back.
            held = traffic.send(requests.Session(), "held-during-outage", "@dev task hold until redis returns")
            held_id = held.body["commandId"]  # type: ignore[index]

            healed_at = time.monotonic()
            proxy.heal()
            traffic.mark("recovery")
            assert wait_for(lambda: not store_status(relay)["degraded"], timeout_s=10)
            assert wait_for(lambda: all(d["pendingWriteBack"] == 0 for d in store_status(relay)["domains"].values()),
                            timeout_s=10)
            figures.record("time to recover", time.monotonic() - healed_at)
            traffic.mark("after")
            assert traffic.wait_for_more(20)

            assert agent.send_result(held_id, summary="answered after Redis returned")
            assert wait_for(lambda: (command_record(relay, held_id) or {}).get("status") == "agent_ok")
        figures.record("p99 during the outage", check_invariants(relay, workers, traffic, agent))

        history = [e["status"] for e in command_record(relay, held_id)["events"]]  # type: ignore[index]
        assert sorted(history) == ["agent_ok", "created", "sent_to_agent"]
        assert held_id not in inflight_ids(relay)
        # The outage's writes reached Redis itself: the record is there with its whole history.
        with redis_server.client() as direct:
            stored = direct.get(f"codexbridge:dev:{{audit}}:{held_id}")
        assert stored is not None
        assert sorted(e["status"] for e in json.loads(stored)["data"]["events"]) == sorted(history)
        fallbacks = store_status(relay)["domains"]["idempotency"]["counts"]["fallbacks"]
        assert fallbacks["write"] > 0


def test_without_fallback_routes_answer_503_until_redis_appears(
        proxy: FaultProxy, tmp_path: Path, figures: Figures) -> None:
    proxy.refuse()
    with faulty_relay(proxy, tmp_path, "redis-primary") as relay:
        workers = relay.worker_pids()
        assert requests.get(relay.url("/healthz"), timeout=5).status_code == 200
        with agent_and_traffic(relay, warm_up=0) as (agent, traffic):
            traffic.mark("fault")
            assert traffic.wait_for_more(10, status=503)
            refused = next(s for s in traffic.in_phase("fault") if s.status == 503)
            assert refused.body == {"error": "store_unavailable"}
            assert admin_get(relay, "/machines").status_code == 503
            assert store_status(relay)["degraded"] is True

            healed_at = time.monotonic()
            proxy.heal()
            traffic.mark("recovery")
            assert traffic.wait_for_more(1, timeout_s=10)
            figures.record("time to recover", time.monotonic() - healed_at)
            traffic.mark("after")
            # The agent's next heartbeat registers its machine: commands reach it again.
            assert wait_for(lambda: any(s.body and s.body.get("status") == "sent_to_agent"
                                        for s in traffic.in_phase("after")), timeout_s=10)
            assert traffic.wait_for_more(20)
            assert traffic.drain_retries()
        figures.record("p99 during the outage", check_invariants(relay, workers, traffic, agent))
        assert_retries_processed(traffic)
        assert requests.get(relay.url("/machines"), headers=ADMIN, timeout=5).status_code == 200
