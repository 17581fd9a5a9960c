"""``REDIS_WAIT_REPLICAS``: writes of the correctness-critical domains are followed by ``WAIT``.

Shortfalls are provoked on the plain test server, which has no replica (``WAIT 1`` always answers
0); acknowledgement is shown on a primary with two replicas (``tests/support/redissentinel.py``).
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from config.settings import load_settings
from middleware.breaker import GuardedBreaker
from relay.stores.base import Claim, CounterGuard, Op, StoreUnavailable
from relay.stores.factory import build_redis_store
from relay.stores.keys import KeySpace
from relay.stores.redis import RedisStore
from relay.stores.replication import NotReplicated, ReplicaWait
from tests.support.redisproc import RedisServer
from tests.support.redissentinel import LocalSentinel

KEYS = KeySpace("relay", "test")
RESERVATION = KEYS.key("idempotency", "msg-1")
INFLIGHT = KEYS.key("inflight", "cmd-1", colocated=True)
AUDIT = KEYS.key("audit", "cmd-1", colocated=True)


def waiting(url: str, replicas: int = 1) -> RedisStore:
    wait = ReplicaWait.for_domains(KEYS, replicas, 50)
    return RedisStore(url, breaker=GuardedBreaker(), replica_wait=wait)


@pytest.fixture
def alone(redis_server: RedisServer) -> Iterator[RedisStore]:
    store = waiting(redis_server.url)
    yield store
    store.close()


@pytest.fixture(scope="module")
def replicated() -> Iterator[LocalSentinel]:
    with LocalSentinel(replicas=2) as ha:
        yield ha


def test_only_the_correctness_critical_domains_are_covered() -> None:
    wait = ReplicaWait.for_domains(KEYS, 1, 50)
    assert wait is not None
    assert wait.covers(RESERVATION) and wait.covers(INFLIGHT)
    assert wait.covers(KEYS.key("inflight", "x")) and wait.covers(KEYS.key("idempotency", "x", colocated=True))
    assert not wait.covers(AUDIT) and not wait.covers(KEYS.key("ratelimit", "u"))
    assert ReplicaWait.for_domains(KEYS, 0, 50) is None


def test_an_unreplicated_reservation_is_undone_and_refused(alone: RedisStore, redis_server: RedisServer) -> None:
    with pytest.raises(NotReplicated) as refused:
        alone.set_if_absent(RESERVATION, "v", ttl_ms=60_000)
    assert isinstance(refused.value, StoreUnavailable)
    assert redis_server.client().exists(RESERVATION) == 0
    assert alone.replica_wait is not None and alone.replica_wait.shortfalls == 1


def test_a_reservation_already_taken_is_reported_taken_without_undoing_it(
        alone: RedisStore, redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set(RESERVATION, "first")
    assert alone.set_if_absent(RESERVATION, "second") is False
    assert client.get(RESERVATION) == "first"
    assert alone.replica_wait is not None and alone.replica_wait.shortfalls == 0


def test_an_unreplicated_inflight_record_is_removed_and_refused(alone: RedisStore) -> None:
    with pytest.raises(NotReplicated):
        alone.set(INFLIGHT, "record", ttl_ms=60_000)
    assert alone.get(INFLIGHT) is None


def test_an_unreplicated_claim_keeps_its_result_and_is_counted(alone: RedisStore, redis_server: RedisServer) -> None:
    redis_server.client().set(INFLIGHT, "record")
    assert alone.compare_and_delete(INFLIGHT, "record") is True
    assert alone.get(INFLIGHT) is None
    assert alone.replica_wait is not None and alone.replica_wait.shortfalls == 1


def test_an_unreplicated_claim_with_its_audit_write_keeps_both_and_is_counted(
        alone: RedisStore, redis_server: RedisServer) -> None:
    redis_server.client().set(INFLIGHT, "record")
    claim = Claim(INFLIGHT, "record", KEYS.index_key("inflight", "created", colocated=True), "cmd-1")
    assert alone.compare_and_set_then_claim(AUDIT, None, "answered", None, claim) == (True, True)
    assert alone.get(AUDIT) == "answered" and alone.get(INFLIGHT) is None
    assert alone.replica_wait is not None and alone.replica_wait.shortfalls == 1


def test_a_guarded_reservation_is_undone_but_its_hit_stays_counted(alone: RedisStore) -> None:
    guard = CounterGuard(KEYS.key("ratelimit", "u1"), 1, 60_000, 10)
    with pytest.raises(NotReplicated):
        alone.guarded_reserve(guard, RESERVATION, "v", 60_000)
    assert alone.get(RESERVATION) is None
    assert alone.get(guard.key) == "1"


def test_a_batch_with_a_covered_write_waits_and_undoes_only_that_write(alone: RedisStore) -> None:
    with pytest.raises(NotReplicated):
        alone.execute([Op("set", (AUDIT, "created")), Op("set", (INFLIGHT, "record", 60_000)),
                       Op("index_add", (KEYS.index_key("inflight", "created", colocated=True), {"cmd-1": 1.0}))])
    assert alone.get(AUDIT) == "created"
    assert alone.get(INFLIGHT) is None


def test_writes_outside_the_domains_never_wait(alone: RedisStore) -> None:
    assert alone.set_if_absent(AUDIT, "v") is True
    assert alone.execute([Op("set", (KEYS.key("locale", "u"), "en")), Op("get", (AUDIT,))]) == [None, "v"]
    assert alone.replica_wait is not None and alone.replica_wait.shortfalls == 0


def test_acknowledged_writes_are_on_the_replicas_when_the_call_returns(replicated: LocalSentinel) -> None:
    store = waiting(replicated.url, replicas=2)
    try:
        for n in range(20):
            key = KEYS.key("idempotency", f"acked-{n}")
            assert store.set_if_absent(key, "v", ttl_ms=60_000) is True
            for port in replicated.data_ports[1:]:
                with replicated.node_client(port) as replica:
                    assert replica.get(key) == "v"
        assert store.replica_wait is not None and store.replica_wait.shortfalls == 0
    finally:
        store.close()


def test_the_factory_waits_when_redis_wait_replicas_is_set(redis_server: RedisServer) -> None:
    settings = load_settings({"REDIS_URL": redis_server.url, "STORE_APP": "relay", "STORE_ENV": "test",
                              "REDIS_WAIT_REPLICAS": "1", "REDIS_WAIT_TIMEOUT_MS": "20"})
    store = build_redis_store(settings)
    try:
        assert store.replica_wait is not None
        assert (store.replica_wait.replicas, store.replica_wait.timeout_ms) == (1, 20)
        with pytest.raises(NotReplicated):
            store.set_if_absent(RESERVATION, "v")
    finally:
        store.close()
    plain = build_redis_store(load_settings({"REDIS_URL": redis_server.url}))
    assert plain.replica_wait is None
    plain.close()
