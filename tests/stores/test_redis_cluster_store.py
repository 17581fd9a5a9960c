"""``RedisClusterStore`` beyond the contract suite: batches across slots and nodes, topology errors,
and the refusal of a cluster by the single-node store. On the local 3-primary cluster (conftest)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from middleware.breaker import GuardedBreaker
from relay.stores.base import CounterGuard, Op, StoreError, StoreUnavailable
from relay.stores.keys import KeySpace
from relay.stores.redis import RedisStore
from relay.stores.redis_cluster import RedisClusterStore
from relay.stores.replication import NotReplicated, ReplicaWait
from tests.support.rediscluster import LocalRedisCluster

KEYS = KeySpace("relay", "test")


@pytest.fixture
def cluster(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def store(cluster: LocalRedisCluster) -> Iterator[RedisClusterStore]:
    made = RedisClusterStore(cluster.url, breaker=GuardedBreaker())
    yield made
    made.close()


def spread_keys(cluster: LocalRedisCluster, count: int) -> list[str]:
    """``count`` keys whose slots lie on every primary."""
    with cluster.client() as client:
        keys = [f"k{n}" for n in range(count)]
        owners = {client.get_node_from_key(key).name for key in keys}
    assert len(owners) == 3
    return keys


def test_a_batch_over_every_node_runs_in_order(store: RedisClusterStore, cluster: LocalRedisCluster) -> None:
    keys = spread_keys(cluster, 12)
    ops = [Op("set", (key, f"v{n}")) for n, key in enumerate(keys)]
    ops += [Op("get", (key,)) for key in keys]
    ops += [Op("mget", (keys,)), Op("delete", tuple(keys[:4])), Op("mget", (keys[:5],))]
    results = store.execute(ops)
    assert results[12:24] == [f"v{n}" for n in range(12)]
    assert results[24] == [f"v{n}" for n in range(12)]
    assert results[25:] == [4, [None, None, None, None, "v4"]]


def test_scripts_in_a_batch_run_on_the_node_of_their_slot(store: RedisClusterStore) -> None:
    record = KEYS.key("inflight", "c1", colocated=True)
    index = KEYS.index_key("inflight", "created", colocated=True)
    results = store.execute([
        Op("compare_and_set", (record, None, "r1")),
        Op("index_add_capped", (index, {"c0": 0.0, "c1": 1.0}, 1, KEYS.prefix("inflight", colocated=True))),
        Op("compare_and_delete", (record, "r1")),
        Op("incr", (KEYS.key("ratelimit", "u"), 2, 60_000)),
    ])
    assert results == [True, ["c0"], True, 2]
    assert store.index_range(index) == [("c1", 1.0)]


def test_a_capped_index_of_a_spread_domain_deletes_records_on_other_nodes(store: RedisClusterStore) -> None:
    prefix = KEYS.prefix("templates")
    store.mset({prefix + f"t{n}": "x" for n in range(6)})
    dropped = store.index_add_capped(KEYS.index_key("templates", "created"), {f"t{n}": float(n) for n in range(6)},
                                     2, prefix)
    assert dropped == ["t0", "t1", "t2", "t3"]
    assert store.mget([prefix + f"t{n}" for n in range(6)]) == [None, None, None, None, "x", "x"]


def test_mset_with_a_ttl_sets_every_slot(store: RedisClusterStore, cluster: LocalRedisCluster) -> None:
    keys = spread_keys(cluster, 12)
    store.mset({key: "v" for key in keys}, ttl_ms=60_000)
    assert all(0 < store.ttl_ms(key) <= 60_000 for key in keys)


def test_a_guarded_reservation_takes_two_steps_across_slots(store: RedisClusterStore) -> None:
    guard = CounterGuard(KEYS.key("ratelimit", "u1"), 1, 60_000, 1)
    reservation = KEYS.key("idempotency", "m1")
    assert store.guarded_reserve(guard, reservation, "v", 60_000) == (1, True)
    assert store.guarded_reserve(guard, KEYS.key("idempotency", "m2"), "v", 60_000) == (2, False)
    assert store.get(KEYS.key("idempotency", "m2")) is None


def test_waiting_for_a_replica_the_cluster_has_not_is_refused(cluster: LocalRedisCluster) -> None:
    waiting = RedisClusterStore(cluster.url, breaker=GuardedBreaker(),
                                replica_wait=ReplicaWait.for_domains(KEYS, 1, 20))
    try:
        with pytest.raises(NotReplicated):
            waiting.set_if_absent(KEYS.key("idempotency", "m1"), "v")
        assert waiting.get(KEYS.key("idempotency", "m1")) is None
    finally:
        waiting.close()


def test_topology_changes_are_outages_and_client_mistakes_are_errors(
        store: RedisClusterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*args: object, **kwargs: object) -> None:
        raise redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down")

    monkeypatch.setattr(RedisCluster, "get", down)
    with pytest.raises(StoreUnavailable):
        store.get("k")
    monkeypatch.undo()

    def confused(*args: object, **kwargs: object) -> None:
        raise redis.exceptions.RedisClusterException("MGET - all keys must map to the same key slot")

    monkeypatch.setattr(RedisCluster, "get", confused)
    with pytest.raises(StoreError) as error:
        store.get("k")
    assert not isinstance(error.value, StoreUnavailable)


def test_the_data_loss_marker_is_found_on_its_node(store: RedisClusterStore, cluster: LocalRedisCluster) -> None:
    losses: list[int] = []
    store.watch_data_loss(KEYS.index_key("store", "epoch"), lambda: losses.append(1))
    assert store.check_data_loss() is False
    cluster.flush()
    assert store.check_data_loss() is True
    assert losses == [1]


def test_an_unreachable_cluster_is_an_outage() -> None:
    unreachable = RedisClusterStore("redis+cluster://127.0.0.1:1", breaker=GuardedBreaker())
    with pytest.raises(StoreUnavailable):
        unreachable.get("k")


def test_the_single_node_store_refuses_a_cluster(cluster: LocalRedisCluster) -> None:
    with pytest.raises(ValueError, match="RedisClusterStore"):
        RedisStore(cluster.url, breaker=None).get("k")
