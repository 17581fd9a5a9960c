"""Redis slow or silent in the middle of traffic (docs/failure-modes.md, "Redis timing out"):
latency with jitter, a blackhole, SIGSTOP, and connections reset as the reply comes back."""
from __future__ import annotations

import time
from pathlib import Path

from tests.cluster.harness import wait_for
from tests.faults.conftest import Figures
from tests.faults.harness import (
    agent_and_traffic,
    assert_retries_processed,
    breaker_transitions,
    check_invariants,
    faulty_relay,
    p99,
    store_status,
)
from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer

CYCLE = [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def rejected_calls(relay: object) -> int:
    return sum(d["counts"]["rejected"] for d in store_status(relay)["domains"].values())  # type: ignore[arg-type]


def test_blackhole_with_fallback_is_bounded_and_the_breaker_cycles(
        proxy: FaultProxy, tmp_path: Path, figures: Figures) -> None:
    with faulty_relay(proxy, tmp_path, "redis-read") as relay:
        workers = relay.worker_pids()
        with agent_and_traffic(relay) as (agent, traffic):
            traffic.mark("latency")
            proxy.latency(30, jitter_ms=20)
            assert traffic.wait_for_more(15)
            proxy.heal()

            traffic.mark("fault")
            proxy.blackhole()
            assert traffic.wait_for_more(40)
            assert wait_for(lambda: rejected_calls(relay) > 0, timeout_s=5)  # the open breaker fails fast
            assert store_status(relay)["degraded"] is True

            healed_at = time.monotonic()
            proxy.heal()
            traffic.mark("after")
            assert wait_for(lambda: not store_status(relay)["degraded"], timeout_s=10)
            figures.record("time to recover", time.monotonic() - healed_at)
            assert traffic.wait_for_more(20)
        figures.record("p99 with 30±20 ms latency", p99(traffic.in_phase("latency")))
        figures.record("p99 during the blackhole", check_invariants(relay, workers, traffic, agent))
        assert traffic.statuses("fault") == {200: len(traffic.in_phase("fault"))}  # memory served everything
        transitions = breaker_transitions(relay)
        assert all(transitions.get(step, 0) >= 1 for step in CYCLE), transitions


def test_sigstop_and_lost_replies_without_fallback_fail_fast_and_lose_nothing(
        proxy: FaultProxy, redis_server: RedisServer, tmp_path: Path, figures: Figures) -> None:
    with faulty_relay(proxy, tmp_path, "redis-primary") as relay:
        workers = relay.worker_pids()
        with agent_and_traffic(relay) as (agent, traffic):

            traffic.mark("fault")
            redis_server.pause()
            try:
                assert traffic.wait_for_more(30, status=503)
                assert wait_for(lambda: rejected_calls(relay) > 0, timeout_s=5)
            finally:
                resumed_at = time.monotonic()
                redis_server.resume()
            traffic.mark("after-sigstop")
            assert traffic.wait_for_more(20)
            figures.record("time to recover (SIGSTOP)", time.monotonic() - resumed_at)

            traffic.mark("lost-replies")
            proxy.reset_on_reply()
            assert traffic.wait_for_more(10, status=503)
            healed_at = time.monotonic()
            proxy.heal()
            traffic.mark("after")
            assert traffic.wait_for_more(20)
            figures.record("time to recover (lost replies)", time.monotonic() - healed_at)
            assert traffic.drain_retries()
        figures.record("p99 during SIGSTOP", check_invariants(relay, workers, traffic, agent))
        figures.record("p99 with replies lost", p99(traffic.in_phase("lost-replies")))
        assert max(s.seconds for s in traffic.in_phase("lost-replies")) < 3.0
        # A reservation applied before its reply was lost, or a release that could not reach Redis, does
        # not swallow the sender's retry: every refused msgId was processed in the end.
        assert_retries_processed(traffic)
        transitions = breaker_transitions(relay)
        assert all(transitions.get(step, 0) >= 1 for step in CYCLE), transitions
