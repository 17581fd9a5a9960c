"""Redis out of memory with ``maxmemory-policy noeviction`` (docs/failure-modes.md, "Redis refusing
writes"): reads still work, writes are refused, and the relay treats the refusal like an outage."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.cluster.harness import wait_for
from tests.faults.conftest import Figures
from tests.faults.harness import (
    agent_and_traffic,
    assert_retries_processed,
    check_invariants,
    faulty_relay,
    store_status,
)
from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer


@pytest.fixture
def direct(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.config_set("maxmemory", "0")
    client.close()


def fill_up(client: redis.Redis) -> None:
    """Make every write fail: more data than ``maxmemory`` allows, and no eviction."""
    client.set("ballast", "x" * 4_000_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")


@pytest.mark.parametrize(("phase", "status"), [("redis-read", 200), ("redis-primary", 503)])
def test_refused_writes_are_handled_like_an_outage(
        phase: str, status: int, proxy: FaultProxy, direct: redis.Redis, tmp_path: Path, figures: Figures) -> None:
    with faulty_relay(proxy, tmp_path, phase) as relay:
        workers = relay.worker_pids()
        with agent_and_traffic(relay) as (agent, traffic):
            traffic.mark("fault")
            fill_up(direct)
            assert traffic.wait_for_more(30, status=status)
            health = store_status(relay)["redis"]
            assert health["degraded"] is True and health["writesRefused"] > 0
            assert health["breaker"] == "closed"  # Redis answers: no breaker failure

            freed_at = time.monotonic()
            direct.config_set("maxmemory", "0")
            traffic.mark("after")
            assert wait_for(lambda: all(d["pendingWriteBack"] == 0 for d in store_status(relay)["domains"].values())
                            and not store_status(relay)["degraded"], timeout_s=15)
            figures.record("time to recover", time.monotonic() - freed_at)
            assert traffic.wait_for_more(20)
            assert traffic.drain_retries()
        figures.record("p99 while writes are refused", check_invariants(relay, workers, traffic, agent))
        assert_retries_processed(traffic)
        if status == 200:
            assert traffic.statuses("fault") == {200: len(traffic.in_phase("fault"))}
