"""The relay on a local 3-primary Redis Cluster: two instances of two gunicorn workers each.

``REDIS_URL`` is the cluster's ``redis+cluster://`` URL, so the store is ``RedisClusterStore`` and
the bus uses sharded pub/sub. Agents and callbacks land on different instances (and workers), so
delivery crosses processes through ``SPUBLISH``; ordinary domains spread over every primary, and
listings must see all of them.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.harness import Cluster, ClusterAgent, callback, get, machine_ids, post, race_one_msg_id, wait_for
from tests.support.live_relay import LiveRelay
from tests.support.rediscluster import LocalRedisCluster

STORE_ENV = "ha"
USERS = "u1,dup,spread"


@pytest.fixture(scope="module")
def relays(redis_cluster: LocalRedisCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_cluster.flush()
    audit_dir = tmp_path_factory.mktemp("ha-cluster-audit")
    relays = Cluster({
        "STORE_BACKEND": "redis", "REDIS_URL": redis_cluster.url, "STORE_ENV": STORE_ENV,
        "RELAY_WORKERS": "2", "RELAY_CONNECTIONS": "128", "RELAY_ADMIN_TOKEN": "cluster-admin",
        "ALLOWLIST_USERS": USERS, "RATE_LIMIT_PER_MINUTE": "1000", "SWEEP_INTERVAL_MS": "250",
        "AUDIT_LOG_PATH": str(audit_dir / "audit.jsonl"), "LOG_LEVEL": "WARNING",
    })
    try:
        relays.start(2)
        yield relays
    finally:
        relays.stop_all()


@pytest.fixture
def pair(relays: Cluster) -> tuple[LiveRelay, LiveRelay]:
    a, b = relays.ensure(2)
    return a, b


def answered(relay: LiveRelay, command_id: str) -> bool:
    """Created, sent and answered ``ok`` (the answer may be audited before ``sent_to_agent``)."""
    record = get(relay, f"/commands/{command_id}")
    return record["status"] == "agent_ok" and sorted(e["status"] for e in record["events"]) == [
        "agent_ok", "created", "sent_to_agent"]


def keys_per_primary(cluster: LocalRedisCluster, pattern: str) -> dict[int, int]:
    counts = {}
    for port in cluster.primary_ports():
        with cluster.node_client(port) as node:
            counts[port] = sum(1 for _ in node.scan_iter(match=pattern, count=1000))
    return counts


def test_callbacks_reach_an_agent_on_the_other_instance_and_are_audited(pair: tuple[LiveRelay, LiveRelay]) -> None:
    a, b = pair
    with ClusterAgent("box-c1", [a.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: "box-c1" in machine_ids(b))
        acks = [callback(b, f"@dev cluster task {n}", "box-c1", "u1").json() for n in range(8)]
        assert [ack["status"] for ack in acks] == ["sent_to_agent"] * 8
        ids = [ack["commandId"] for ack in acks]
        assert wait_for(lambda: [c["commandId"] for c in agent.commands()] == ids)
        for relay in (a, b):
            assert wait_for(lambda relay=relay: all(answered(relay, i) for i in ids))
        assert get(a, "/audit/recent?limit=50") == get(b, "/audit/recent?limit=50")

        held = callback(b, "@dev hold on the cluster", "box-c1", "u1").json()["commandId"]
        assert wait_for(lambda: held in [i["commandId"] for i in get(a, "/inflight")["items"]])
        assert post(b, f"/commands/{held}/cancel").json() == {"status": "cancel_sent", "commandId": held}
        assert wait_for(lambda: [f["commandId"] for f in agent.frames("command.cancel")] == [held])
        retried = post(a, f"/commands/{held}/retry").json()
        assert retried["status"] == "retried_sent"
        assert wait_for(lambda: agent.commands()[-1]["commandId"] == retried["commandId"])


def test_a_msg_id_sent_to_both_instances_is_dispatched_once(pair: tuple[LiveRelay, LiveRelay]) -> None:
    a, b = pair
    with ClusterAgent("box-c2", [b.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: "box-c2" in machine_ids(a))
        results = race_one_msg_id((a, b), 40, "@dev only once", "box-c2", "cluster-dup-1")
        assert results.count("sent_to_agent") == 1
        assert results.count("duplicate_ignored") == 39
        assert wait_for(lambda: len(agent.commands()) == 1)
        records = get(a, "/audit/recent?limit=50&machineId=box-c2")["items"]
        assert [r["commandId"] for r in records] == [c["commandId"] for c in agent.commands()]


def test_domains_spread_over_the_primaries_and_listings_see_them_all(
        pair: tuple[LiveRelay, LiveRelay], redis_cluster: LocalRedisCluster) -> None:
    a, b = pair
    with ClusterAgent("box-c3", [a.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: all("box-c3" in machine_ids(relay) for relay in (a, b)))
        acks = [callback((a, b)[n % 2], f"@dev spread {n}", "box-c3", "spread", msg_id=f"spread-{n}").json()
                for n in range(30)]
        assert [ack["status"] for ack in acks] == ["sent_to_agent"] * 30
        ids = [ack["commandId"] for ack in acks]
        assert wait_for(lambda: all(answered(b, i) for i in ids)), [get(b, f"/commands/{i}") for i in ids
                                                                   if not answered(b, i)]

    reservations = keys_per_primary(redis_cluster, f"codexbridge:{STORE_ENV}:idempotency:spread-*")
    assert sum(reservations.values()) == 30
    assert sum(1 for count in reservations.values() if count) >= 2, reservations
    audit = keys_per_primary(redis_cluster, f"codexbridge:{STORE_ENV}:{{audit}}:*")
    assert sum(1 for count in audit.values() if count) == 1, audit  # a colocated domain: one slot

    inventory = get(a, "/ops/store/inventory")
    idempotency = inventory["domains"]["idempotency"]["backends"]["redis"]
    everywhere = keys_per_primary(redis_cluster, f"codexbridge:{STORE_ENV}:idempotency:*")
    assert idempotency["keys"] == sum(everywhere.values())
    recent = {r["commandId"] for r in get(b, "/audit/recent?limit=200&machineId=box-c3")["items"]}
    assert set(ids) <= recent


def test_a_dead_holder_is_found_by_its_missing_shard_subscriber(relays: Cluster,
                                                                 pair: tuple[LiveRelay, LiveRelay]) -> None:
    a, b = pair
    with ClusterAgent("box-c4", [a.agent_url]) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: "box-c4" in machine_ids(b))
        relays.kill(a)
        offline = callback(b, "@dev anyone there", "box-c4", "u1").json()
        assert offline["status"] == "machine_offline"
        assert wait_for(lambda: "box-c4" not in machine_ids(b), timeout_s=10)
