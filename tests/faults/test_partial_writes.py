"""Partial dual writes (docs/failure-modes.md, "One copy of a dual write fails"): memory takes a write
and Redis does not, and the inverse. Each is counted, and repaired from the authoritative backend
once the failing one answers again."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.cluster.harness import wait_for
from tests.faults.conftest import Figures
from tests.faults.harness import (
    agent_and_traffic,
    check_invariants,
    command_record,
    faulty_relay,
    store_status,
)
from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer

AUDIT_KEY = "codexbridge:dev:{{audit}}:{}"


def secondary_failures(relay: Any) -> int:
    return sum(d["counts"]["secondaryFailures"] for d in store_status(relay)["domains"].values())


def journal_empty(relay: Any) -> bool:
    return all(d["pendingWriteBack"] == 0 for d in store_status(relay)["domains"].values())


def test_redis_mirror_failing_under_memory_authority_is_repaired(
        proxy: FaultProxy, redis_server: RedisServer, tmp_path: Path, figures: Figures) -> None:
    with faulty_relay(proxy, tmp_path, "shadow") as relay:
        workers = relay.worker_pids()
        with agent_and_traffic(relay) as (agent, traffic):
            traffic.mark("fault")
            proxy.refuse()
            proxy.reset()
            assert traffic.wait_for_more(40)
            assert secondary_failures(relay) > 0
            assert not journal_empty(relay)

            healed_at = time.monotonic()
            proxy.heal()
            traffic.mark("after")
            assert wait_for(lambda: journal_empty(relay), timeout_s=10)
            figures.record("time to repair Redis", time.monotonic() - healed_at)
            assert traffic.wait_for_more(10)
        figures.record("p99 with the Redis mirror failing", check_invariants(relay, workers, traffic, agent))
        assert traffic.statuses("fault") == {200: len(traffic.in_phase("fault"))}

        accepted = traffic.accepted()
        wait_for(lambda: journal_empty(relay), timeout_s=5)
        with redis_server.client() as direct:
            for command_id, msg_id in accepted.items():
                stored = direct.get(AUDIT_KEY.format(command_id))
                assert stored is not None, f"audit record of {command_id} missing in Redis"
                assert json.loads(stored)["data"] == command_record(relay, command_id)
                assert direct.exists(f"codexbridge:dev:idempotency:{msg_id}")

            def redis_inflight() -> set[str]:
                return {k.rsplit(":", 1)[1] for k in direct.scan_iter("codexbridge:dev:{inflight}:*")
                        if ":#" not in k}

            # Every command was answered: no stale in-flight copy stays in Redis. An answer is audited
            # before its record is claimed, so the last claims may still be on their way.
            assert wait_for(lambda: redis_inflight() == set(), timeout_s=5), redis_inflight()


def test_memory_mirror_failing_under_redis_authority_is_repaired(
        proxy: FaultProxy, tmp_path: Path, figures: Figures) -> None:
    switch = tmp_path / "memory-fails"
    app = "tests.faults.app_for_faults:create_app()"
    with faulty_relay(proxy, tmp_path, "redis-read", app=app, FAULT_MEMORY_SWITCH=str(switch)) as relay:
        workers = relay.worker_pids()
        with agent_and_traffic(relay) as (agent, traffic):
            traffic.mark("fault")
            switch.touch()
            assert traffic.wait_for_more(40)
            assert secondary_failures(relay) > 0
            during = [s.body["commandId"] for s in traffic.in_phase("fault")
                      if s.status == 200 and s.body and s.body.get("commandId")]
            assert during

            healed_at = time.monotonic()
            switch.unlink()
            traffic.mark("after")
            assert wait_for(lambda: journal_empty(relay), timeout_s=10)
            figures.record("time to repair memory", time.monotonic() - healed_at)
            assert traffic.wait_for_more(10)
            expected = {c: command_record(relay, c) for c in during}  # read from Redis

            # Memory now serves Redis's outage with the commands it missed while it was failing.
            traffic.mark("redis-outage")
            proxy.refuse()
            proxy.reset()
            assert traffic.wait_for_more(10)
            assert store_status(relay)["degraded"] is True
            assert {c: command_record(relay, c) for c in during} == expected
            proxy.heal()
            traffic.mark("end")
            assert wait_for(lambda: journal_empty(relay) and not store_status(relay)["degraded"], timeout_s=10)
        figures.record("p99 with the memory mirror failing", check_invariants(relay, workers, traffic, agent))
        assert traffic.statuses("fault") == {200: len(traffic.in_phase("fault"))}
