"""The store-level mechanisms behind the live fault scenarios, one at a time against a real
redis-server (through the fault proxy where a fault is needed): data-loss detection, writes refused
for want of memory, the undo of a reservation whose answer was lost, mirror repairs, and the
journal's claim of a key being settled."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Connection as RedisConnection
from redis import ConnectionError as RedisConnectionError

from config.phases import PRESETS
from middleware.breaker import GuardedBreaker
from middleware.observer import NullObserver
from middleware.retry import RetryPolicy
from middleware.routed_store import RoutedStore
from middleware.routing import StoreRouter
from middleware.writeback import REPAIR_REDIS, WRITE_BACK, Reconciler, WriteBackJournal, undo
from relay.domains import idempotency
from relay.stores.base import Op, Store, StoreUnavailable
from relay.stores.envelope import iso_ms
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.faults.app_for_faults import SwitchableMemory
from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer

PREFIX = "t:dev:{audit}:"
MARKER = "t:dev:store:#epoch"


def envelope(data: object, at_ms: int) -> str:
    return json.dumps({"version": 1, "updatedAt": iso_ms(at_ms), "data": data})


def redis_store(url: str) -> RedisStore:
    return RedisStore(url, breaker=GuardedBreaker(fail_max=100, reset_timeout=0.05), retry=RetryPolicy(max_retries=1),
                      socket_timeout_ms=200, connect_timeout_ms=200, op_deadline_ms=500)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    redis = redis_store(redis_server.url)
    yield redis
    redis.close()


def routed(phase: str, backends: dict[str, Store], journal: WriteBackJournal, **changes: object) -> RoutedStore:
    plan = PRESETS[phase]
    if changes:
        plan = type(plan)(**{**plan.__dict__, **changes})
    return RoutedStore("audit", plan, backends, NullObserver(), journal=journal)


# -- data loss --------------------------------------------------------------------------------------
def test_a_flush_is_noticed_once_by_the_periodic_check(store: RedisStore, redis_server: RedisServer) -> None:
    losses: list[int] = []
    store.watch_data_loss(MARKER, lambda: losses.append(1))
    assert store.check_data_loss() is False  # first sight: the marker is adopted
    store.set("t:dev:x", "1")
    with redis_server.client() as direct:
        direct.flushall()
    assert store.check_data_loss() is True
    assert store.check_data_loss() is False
    assert losses == [1] and store.health()["dataLosses"] == 1


def test_a_restart_without_persistence_is_noticed_on_the_next_connection(
        store: RedisStore, redis_server: RedisServer) -> None:
    losses: list[int] = []
    store.watch_data_loss(MARKER, lambda: losses.append(1))
    assert store.set_if_absent("t:dev:before", "1") is True
    redis_server.stop()
    redis_server.start()
    outcomes = []
    for _ in range(5):  # the broken pooled connection, then the new one that finds the marker gone
        try:
            outcomes.append(store.set_if_absent("t:dev:after", "1"))
            break
        except StoreUnavailable:
            outcomes.append(None)
    assert outcomes[-1] is True and None in outcomes
    assert losses == [1]


def test_a_store_used_before_the_marker_was_known_adopts_it_at_once(
        store: RedisStore, redis_server: RedisServer) -> None:
    """A store used before ``watch_data_loss`` (the relay reads its flags at startup) holds a
    connection that never looked at the marker, and it may be the only one (a gevent worker shares
    one): the epoch is adopted when the marker becomes known, so a loss before the first periodic
    check is still a loss."""
    assert store.execute([Op("set", ("t:dev:before", "1", None))]) == [None]
    losses: list[int] = []
    store.watch_data_loss(MARKER, lambda: losses.append(1))
    assert redis_server.client().get(MARKER) is not None
    redis_server.stop()
    redis_server.start()
    for _ in range(5):
        try:
            store.execute([Op("get", ("t:dev:before",))])
            break
        except StoreUnavailable:
            continue
    assert losses == [1] and store.data_losses == 1


def test_a_connection_that_finds_the_marker_just_replaced_by_another_fails_its_first_command(
        store: RedisStore, redis_server: RedisServer) -> None:
    """Two connections made after a restart: the one whose look at the marker comes second finds the
    epoch the first adopted. It noticed no loss itself, but its caller may have begun before the loss
    was known, so its first command fails too."""
    losses: list[int] = []
    store.watch_data_loss(MARKER, lambda: losses.append(1))
    assert store.check_data_loss() is False  # the marker is adopted
    with redis_server.client() as direct:
        direct.flushall()
    connection = RedisConnection(host="127.0.0.1", port=redis_server.port, decode_responses=True)

    class ConnectingWhileAnotherNotices:
        def on_connect(self) -> None:
            connection.connect()
            assert store.check_data_loss() is True  # another connection notices the loss meanwhile

        def send_command(self, *args: object) -> None:
            connection.send_command(*args)

        def read_response(self) -> object:
            return connection.read_response()

    try:
        with pytest.raises(RedisConnectionError):
            store._on_connect(ConnectingWhileAnotherNotices())
        assert losses == [1]
    finally:
        connection.disconnect()


def test_a_unit_of_work_begun_before_a_loss_does_not_decide_on_the_emptied_server(
        store: RedisStore, redis_server: RedisServer) -> None:
    memory = MemoryStore()
    router = StoreRouter(KeySpace("t", "dev"), {"idempotency": idempotency.DOMAIN},
                         {"memory": memory, "redis": store}, {"idempotency": PRESETS["redis-read"]})
    store.watch_data_loss(MARKER, router.redis_data_lost)
    try:
        assert store.check_data_loss() is False
        with router.bound():
            assert router.store("idempotency").set_if_absent("m1", {"reservedAtMs": 1}) is True
        with router.bound():
            stale = router.store("idempotency")
            with redis_server.client() as direct:
                direct.flushall()
            assert store.check_data_loss() is True  # noticed while this unit of work runs
            # decided by memory, which holds every reservation, not by the emptied server
            assert stale.set_if_absent("m1", {"reservedAtMs": 2}) is False
            assert stale.set_if_absent("m2", {"reservedAtMs": 2}) is True
        with router.bound():  # a unit of work begun after: Redis, with memory pulled over first
            assert router.store("idempotency").set_if_absent("m1", {"reservedAtMs": 3}) is False
            assert router.store("idempotency").set_if_absent("m2", {"reservedAtMs": 3}) is False
    finally:
        router.close()


def test_without_a_memory_copy_a_unit_of_work_begun_before_a_loss_fails_as_in_an_outage(
        store: RedisStore, redis_server: RedisServer) -> None:
    router = StoreRouter(KeySpace("t", "dev"), {"idempotency": idempotency.DOMAIN},
                         {"memory": MemoryStore(), "redis": store}, {"idempotency": PRESETS["redis-primary"]})
    store.watch_data_loss(MARKER, router.redis_data_lost)
    try:
        assert store.check_data_loss() is False
        with router.bound():
            stale = router.store("idempotency")
            with redis_server.client() as direct:
                direct.flushall()
            assert store.check_data_loss() is True
            with pytest.raises(StoreUnavailable):
                stale.set_if_absent("m1", {"reservedAtMs": 1})
        with router.bound():  # the sender's retry, after: decided by Redis
            assert router.store("idempotency").set_if_absent("m1", {"reservedAtMs": 2}) is True
    finally:
        router.close()


def test_the_periodic_check_opening_the_first_connection_does_not_deadlock(store: RedisStore) -> None:
    store.watch_data_loss(MARKER, lambda: None)
    checker = threading.Thread(target=store.check_data_loss, daemon=True)
    checker.start()
    checker.join(timeout=5)
    assert not checker.is_alive()


# -- memory pressure --------------------------------------------------------------------------------
def test_writes_refused_for_memory_are_unavailable_without_tripping_the_breaker(
        store: RedisStore, redis_server: RedisServer) -> None:
    with redis_server.client() as direct:
        store.set("t:dev:kept", "readable")
        direct.set("ballast", "x" * 2_000_000)
        direct.config_set("maxmemory-policy", "noeviction")
        direct.config_set("maxmemory", "1mb")
        try:
            with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
                store.set("t:dev:new", "refused")
            assert store.get("t:dev:kept") == "readable"
            assert store.breaker_state == "closed"
            assert store.degraded is True and store.health()["writesRefused"] == 1
        finally:
            direct.config_set("maxmemory", "0")
    store.set("t:dev:new", "accepted")


# -- a reservation whose answer is lost ---------------------------------------------------------------
def test_a_reservation_applied_but_unanswered_is_undone_before_the_retry(redis_server: RedisServer) -> None:
    journal = WriteBackJournal()
    with FaultProxy(redis_server.port) as proxy, redis_server.client() as direct:
        redis = redis_store(proxy.redis_url())
        backends: dict[str, Store] = {"memory": MemoryStore(), "redis": redis}
        reservations = routed("redis-primary", backends, journal)
        value = envelope({"reservedAtMs": 1}, 1)
        assert redis.ping()
        proxy.reset_on_reply()
        with pytest.raises(StoreUnavailable):
            reservations.set_if_absent(PREFIX + "msg-1", value)
        assert direct.get(PREFIX + "msg-1") == value  # Redis did take it
        proxy.heal()
        # The sender's retry: the orphan is undone first, so the message is processed.
        assert reservations.set_if_absent(PREFIX + "msg-1", envelope({"reservedAtMs": 2}, 2)) is True
        assert journal.pending() == {}
        redis.close()


def test_the_undo_never_removes_another_requests_reservation(redis_server: RedisServer) -> None:
    journal = WriteBackJournal()
    with FaultProxy(redis_server.port) as proxy, redis_server.client() as direct:
        redis = redis_store(proxy.redis_url())
        backends: dict[str, Store] = {"memory": MemoryStore(), "redis": redis}
        reservations = routed("redis-primary", backends, journal)
        assert redis.ping()
        proxy.refuse()
        proxy.reset()
        with pytest.raises(StoreUnavailable):
            reservations.set_if_absent(PREFIX + "msg-2", envelope({"reservedAtMs": 1}, 1))
        proxy.heal()
        direct.set(PREFIX + "msg-2", envelope({"reservedAtMs": 9}, 9))  # someone else's, meanwhile
        Reconciler(backends, journal, NullObserver(), lambda d: PREFIX).run_once()
        assert json.loads(direct.get(PREFIX + "msg-2"))["data"] == {"reservedAtMs": 9}
        redis.close()


# -- partial dual writes ------------------------------------------------------------------------------
def test_a_failed_redis_mirror_is_repaired_deletions_included(redis_server: RedisServer) -> None:
    journal = WriteBackJournal()
    with FaultProxy(redis_server.port) as proxy, redis_server.client() as direct:
        redis = redis_store(proxy.redis_url())
        backends: dict[str, Store] = {"memory": MemoryStore(), "redis": redis}
        audit = routed("dual-write", backends, journal)
        audit.set(PREFIX + "gone", envelope({"n": 0}, 1))
        audit.index_add(PREFIX + "#updated", {"gone": 1.0})
        proxy.refuse()
        proxy.reset()
        audit.set(PREFIX + "new", envelope({"n": 1}, 2))  # memory takes it, the mirror fails
        audit.delete(PREFIX + "gone")
        audit.index_remove(PREFIX + "#updated", ["gone"])
        audit.index_add(PREFIX + "#updated", {"new": 2.0})
        assert journal.pending() == {"audit": 3}
        proxy.heal()
        Reconciler(backends, journal, NullObserver(), lambda d: PREFIX).run_once()
        assert direct.get(PREFIX + "new") == backends["memory"].get(PREFIX + "new")
        assert direct.get(PREFIX + "gone") is None
        assert direct.zrange(PREFIX + "#updated", 0, -1) == ["new"]
        assert journal.pending() == {}
        redis.close()


def test_a_failed_memory_mirror_is_repaired_from_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    journal = WriteBackJournal()
    switch = tmp_path / "memory-fails"
    memory = SwitchableMemory(switch, 1024 * 1024)
    redis = redis_store(redis_server.url)
    backends: dict[str, Store] = {"memory": memory, "redis": redis}
    audit = routed("redis-read", backends, journal)
    switch.touch()
    audit.set(PREFIX + "a", envelope({"n": 1}, 1))  # Redis takes it, the memory mirror fails
    assert memory.get(PREFIX + "a") is None
    reconciler = Reconciler(backends, journal, NullObserver(), lambda d: PREFIX)
    reconciler.run_once()  # memory still refuses: the repair waits
    assert journal.pending() == {"audit": 1}
    switch.unlink()
    reconciler.run_once()
    assert memory.get(PREFIX + "a") == redis.get(PREFIX + "a")
    redis.close()


# -- the journal ------------------------------------------------------------------------------------
def test_a_claimed_key_makes_other_claims_wait_until_released() -> None:
    journal = WriteBackJournal()
    journal.record("audit", ["k"])
    tasks = journal.claim("audit", "k")
    assert tasks == [WRITE_BACK] and journal.has("audit")
    claimed_later: list[object] = []
    waiter = threading.Thread(target=lambda: claimed_later.append(journal.claim("audit", "k", wait_s=5)))
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive()  # waiting for the first claim
    journal.release("audit", "k")
    waiter.join(timeout=5)
    assert claimed_later == [[]] and not journal.has("audit")
    journal.record("audit", ["k"])
    held = journal.claim("audit", "k")
    with pytest.raises(TimeoutError):
        journal.claim("audit", "k", wait_s=0.05)
    journal.release("audit", "k", held)
    assert journal.pending() == {"audit": 1}


def test_undos_accumulate_and_copies_replace_each_other() -> None:
    journal = WriteBackJournal()
    journal.record("idempotency", ["k"], undo("first attempt"))
    journal.record("idempotency", ["k"], undo("second attempt"))
    journal.record("idempotency", ["k"], WRITE_BACK)
    journal.record("idempotency", ["k"], REPAIR_REDIS)
    assert journal.claim("idempotency", "k") == [undo("first attempt"), undo("second attempt"), REPAIR_REDIS]


def test_a_full_journal_counts_new_keys_as_overflow_and_still_records_its_keys() -> None:
    journal = WriteBackJournal(max_keys=2)
    journal.record("audit", ["a", "b"])
    journal.record("audit", ["a", "c"])
    journal.record("audit", ["b"], undo("v"))
    assert journal.keys() == {"audit": ["a", "b"]} and journal.overflow == {"audit": 1}
    assert journal.claim("audit", "a") == [WRITE_BACK]  # recorded twice, carried out once
    assert journal.claim("audit", "b") == [WRITE_BACK, undo("v")]


def test_a_release_that_failed_is_done_before_the_retry(redis_server: RedisServer) -> None:
    journal = WriteBackJournal()
    with FaultProxy(redis_server.port) as proxy:
        redis = redis_store(proxy.redis_url())
        reservations = routed("redis-primary", {"memory": MemoryStore(), "redis": redis}, journal)
        assert reservations.set_if_absent(PREFIX + "msg-3", envelope({"reservedAtMs": 1}, 1)) is True
        proxy.refuse()
        proxy.reset()
        with pytest.raises(StoreUnavailable):
            reservations.delete(PREFIX + "msg-3")  # the request failed and could not release its msgId
        proxy.heal()
        assert reservations.set_if_absent(PREFIX + "msg-3", envelope({"reservedAtMs": 2}, 2)) is True
        redis.close()


def test_the_half_open_trial_settles_the_key_before_deciding(redis_server: RedisServer) -> None:
    journal = WriteBackJournal()
    with FaultProxy(redis_server.port) as proxy:
        redis = RedisStore(proxy.redis_url(), breaker=GuardedBreaker(fail_max=1, reset_timeout=0.2),
                           retry=RetryPolicy(max_retries=0), socket_timeout_ms=200, connect_timeout_ms=200,
                           op_deadline_ms=500)
        reservations = routed("redis-primary", {"memory": MemoryStore(), "redis": redis}, journal)
        assert redis.ping()
        proxy.reset_on_reply()
        with pytest.raises(StoreUnavailable):
            reservations.set_if_absent(PREFIX + "msg-4", envelope({"reservedAtMs": 1}, 1))
        assert redis.breaker_state == "open"
        proxy.heal()
        time.sleep(0.3)  # the reset timeout has passed; the breaker still reads "open" until the next call
        assert redis.breaker_state == "open"
        assert reservations.set_if_absent(PREFIX + "msg-4", envelope({"reservedAtMs": 2}, 2)) is True
        redis.close()
