"""Two relay instances, two gunicorn workers each, on one real redis-server (the issue's integration tests).

The instances run for the whole module (kill and restart tests replace what they stop). Every HTTP
request lands on either worker of the instance it is sent to, and an agent on either worker, so
most steps cross workers as well as instances.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

from relay.stores.keys import KeySpace
from tests.cluster.harness import (
    Cluster,
    ClusterAgent,
    callback,
    get,
    is_terminal,
    machine_ids,
    post,
    race_one_msg_id,
    statuses,
    wait_for,
)
from tests.support.live_relay import LiveRelay, RelayStartError, start_relay
from tests.support.redisproc import RedisServer

STORE_ENV = "cluster"
LEASE_KEY = KeySpace("codexbridge", STORE_ENV).index_key("inflight", "lock:sweeps", colocated=True)
RATE_LIMIT = 250
USERS = "u1,dup,limited,traffic,restart"


@pytest.fixture(scope="module")
def cluster(redis_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_session.resume()
    redis_session.start()
    client = redis_session.client()
    try:
        client.flushall()
    finally:
        client.close()
    audit_dir = tmp_path_factory.mktemp("cluster-audit")
    cluster = Cluster({
        "STORE_BACKEND": "redis", "REDIS_URL": redis_session.url, "STORE_ENV": STORE_ENV,
        "RELAY_WORKERS": "2", "RELAY_CONNECTIONS": "256", "RELAY_ADMIN_TOKEN": "cluster-admin",
        "ALLOWLIST_USERS": USERS, "RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
        "SWEEP_INTERVAL_MS": "250", "INFLIGHT_COMMAND_TIMEOUT_MS": "20000",
        "AUDIT_LOG_PATH": str(audit_dir / "audit.jsonl"),
        "LOG_LEVEL": "WARNING",
    })
    try:
        cluster.start(2)
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def pair(cluster: Cluster) -> tuple[LiveRelay, LiveRelay]:
    a, b = cluster.ensure(2)
    return a, b


def lease_token(redis_session: RedisServer) -> Optional[str]:
    """The instance id holding the sweep lease, if any."""
    client = redis_session.client()
    try:
        token: Optional[str] = client.get(LEASE_KEY)
        return token
    finally:
        client.close()


def lease_pid(redis_session: RedisServer) -> int:
    token = lease_token(redis_session)
    return int(token.split(":")[1]) if token else 0


def answered(relay: LiveRelay, command_id: str) -> bool:
    """Created, sent and answered ``ok``, as seen from ``relay``. A fast agent's answer may be audited
    before ``sent_to_agent`` (the sender writes that after the holder confirmed); the status stays."""
    record = get(relay, f"/commands/{command_id}")
    events = sorted(e["status"] for e in record["events"])
    return record["status"] == "agent_ok" and events == ["agent_ok", "created", "sent_to_agent"]


def without(view: dict[str, Any], moving: str) -> list[dict[str, Any]]:
    """The items of a view without the field that moves with time (``ageMs``, ``lastHeartbeatAt``)."""
    return [{k: v for k, v in item.items() if k != moving} for item in view["items"]]


def test_an_agent_on_one_instance_serves_callbacks_sent_to_the_other(pair: tuple[LiveRelay, LiveRelay]) -> None:
    a, b = pair
    with ClusterAgent("box-a", [a.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: "box-a" in machine_ids(b))
        acks = [callback(b, f"@dev task number {n}", "box-a", "u1").json() for n in range(8)]
        assert [ack["status"] for ack in acks] == ["sent_to_agent"] * 8
        assert acks[0]["locale"] == "zh-CN"  # no result yet: the default
        ids = [ack["commandId"] for ack in acks]
        assert wait_for(lambda: [c["commandId"] for c in agent.commands()] == ids)
        for relay in (a, b):
            assert wait_for(lambda relay=relay: all(answered(relay, i) for i in ids))
        status = callback(b, "@dev status", "box-a", "u1").json()
        assert status["locale"] == "en"
        assert wait_for(lambda: answered(a, status["commandId"]))

        held = callback(b, "@dev hold this one", "box-a", "u1").json()["commandId"]
        assert wait_for(lambda: held in [c["commandId"] for c in agent.commands()])
        for path in ("/audit/recent?limit=100", f"/commands/{held}", f"/commands/{ids[0]}"):
            assert get(a, path) == get(b, path)
        assert without(get(a, "/machines"), "lastHeartbeatAt") == without(get(b, "/machines"), "lastHeartbeatAt")
        assert without(get(a, "/inflight"), "ageMs") == without(get(b, "/inflight"), "ageMs")
        assert held in [i["commandId"] for i in get(a, "/inflight")["items"]]

        cancel = post(b, f"/commands/{held}/cancel")
        assert cancel.json() == {"status": "cancel_sent", "commandId": held}
        assert wait_for(lambda: [f["commandId"] for f in agent.frames("command.cancel")] == [held])
        retried = post(a, f"/commands/{held}/retry").json()
        assert retried["status"] == "retried_sent"
        assert wait_for(lambda: agent.commands()[-1]["commandId"] == retried["commandId"])
        assert agent.commands()[-1]["prompt"] == "hold this one"


def test_rate_limit_windows_are_shared(pair: tuple[LiveRelay, LiveRelay]) -> None:
    a, b = pair
    extra = 6

    def hit(n: int) -> int:
        return callback((a, b)[n % 2], "hi", None, "limited").status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(hit, range(RATE_LIMIT + extra)))
    assert codes.count(429) == extra
    assert codes.count(400) == RATE_LIMIT  # past the limiter, refused for the missing machineId


def test_one_msg_id_sent_200_times_to_both_instances_dispatches_once(pair: tuple[LiveRelay, LiveRelay]) -> None:
    a, b = pair
    with ClusterAgent("box-dup", [b.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: "box-dup" in machine_ids(a))
        results = race_one_msg_id((a, b), 200, "@dev do it once", "box-dup", "dup-msg-1")
        assert results.count("sent_to_agent") == 1
        assert results.count("duplicate_ignored") == 199
        assert wait_for(lambda: len(agent.commands()) >= 1)
        records = get(a, "/audit/recent?limit=50&machineId=box-dup")["items"]
        assert len(records) == 1 and [c["commandId"] for c in agent.commands()] == [records[0]["commandId"]]


def test_kill_9_of_the_sweep_leader_under_traffic_loses_no_accepted_command(
        cluster: Cluster, pair: tuple[LiveRelay, LiveRelay], redis_session: RedisServer) -> None:
    a, b = pair
    leader = cluster.holding_worker(wait_for(lambda: lease_pid(redis_session)))
    assert leader is not None
    survivor = b if leader is a else a
    machines = [f"box-k{i}" for i in range(4)]
    agents = [ClusterAgent(m, [leader.agent_url, survivor.agent_url] if i % 2 == 0
                           else [survivor.agent_url, leader.agent_url])
              for i, m in enumerate(machines)]
    for agent in agents:
        agent.__enter__()
    try:
        assert all(agent.wait_connected() for agent in agents)
        assert wait_for(lambda: set(machines) <= set(machine_ids(survivor)))
        accepted: list[str] = []
        done = 0
        lock = threading.Lock()
        halfway = threading.Event()

        def send(n: int) -> None:
            nonlocal done
            try:
                reply = callback((leader, survivor)[n % 2], f"@dev traffic {n}", machines[n % 4], "traffic")
                ack = reply.json() if reply.status_code == 200 else {}
            except (requests.RequestException, ValueError):
                ack = {}
            with lock:
                if ack.get("commandId"):
                    accepted.append(ack["commandId"])
                done += 1
                if done == 60:
                    halfway.set()

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(send, n) for n in range(160)]
            assert halfway.wait(60)
            cluster.kill(leader)
            for future in futures:
                future.result(timeout=60)
        assert len(accepted) >= 60

        def unaccounted() -> list[str]:
            """Accepted commands neither ended nor in flight."""
            inflight = {i["commandId"] for i in get(survivor, "/inflight")["items"]}
            records = {i: get(survivor, f"/commands/{i}")["status"] for i in accepted}
            return [i for i, status in records.items()
                    if not is_terminal(status) and not (status == "sent_to_agent" and i in inflight)]

        assert wait_for(lambda: not unaccounted(), timeout_s=20, interval_s=0.5), json.dumps([
            get(survivor, f"/commands/{i}") for i in unaccounted()])
        assert wait_for(lambda: lease_pid(redis_session) in survivor.worker_pids())
    finally:
        for agent in agents:
            agent.close()


def test_state_survives_stopping_every_instance(cluster: Cluster, pair: tuple[LiveRelay, LiveRelay],
                                                redis_session: RedisServer) -> None:
    a, b = pair
    with ClusterAgent("box-restart", [a.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: "box-restart" in machine_ids(b))
        finished = callback(a, "@dev finish the report", "box-restart", "restart").json()["commandId"]
        held = callback(b, "@dev hold until after the restart", "box-restart", "restart", msg_id="restart-1").json()
        assert held["status"] == "sent_to_agent"
        assert wait_for(lambda: answered(a, finished))
        assert wait_for(lambda: held["commandId"] in [c["commandId"] for c in agent.commands()])

        cluster.stop_all()
        assert lease_token(redis_session) is None  # released by the workers as they stopped
        new_a, new_b = cluster.ensure(2)
        agent.retarget([new_a.agent_url, new_b.agent_url])
        assert agent.wait_connected(hellos=2)
        assert wait_for(lambda: "box-restart" in machine_ids(new_b))

        again = callback(new_b, "@dev hold until after the restart", "box-restart", "restart", msg_id="restart-1")
        assert again.json()["status"] == "duplicate_ignored"
        assert held["commandId"] in [i["commandId"] for i in get(new_a, "/inflight")["items"]]
        assert agent.send_result(held["commandId"], "ok", "Finished after the relay restart")
        for relay in (new_a, new_b):
            assert wait_for(lambda relay=relay: statuses(relay, held["commandId"])
                            == ["created", "sent_to_agent", "agent_ok"])
        assert held["commandId"] not in [i["commandId"] for i in get(new_b, "/inflight")["items"]]
        assert answered(new_b, finished)

        retried = post(new_b, f"/commands/{finished}/retry").json()
        assert retried["status"] == "retried_sent"
        assert wait_for(lambda: agent.commands()[-1]["commandId"] == retried["commandId"])
        assert agent.commands()[-1]["prompt"] == "finish the report"
        fresh = callback(new_a, "@dev one more", "box-restart", "restart").json()
        assert fresh["status"] == "sent_to_agent"
        assert wait_for(lambda: agent.commands()[-1]["commandId"] == fresh["commandId"])


def test_the_memory_backend_with_two_workers_is_refused_at_startup(tmp_path: Path) -> None:
    env = {"STORE_BACKEND": "memory", "RELAY_WORKERS": "2", "REDIS_URL": "",
           "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with pytest.raises(RelayStartError) as refused:
        start_relay(env=env, startup_timeout_s=20)
    message = str(refused.value)
    assert "RELAY_WORKERS" in message and "process memory" in message
