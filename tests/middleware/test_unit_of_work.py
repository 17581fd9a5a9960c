"""Units of work: deferred writes and prefetched reads share round trips, reads see the unit of work's
own writes, and a failed round trip keeps the routed store's fallback and journal contract."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from config.phases import PRESETS
from middleware.breaker import GuardedBreaker
from middleware.routing import StoreRouter
from middleware.unit_of_work import Recorder
from relay.domains import audit, idempotency, inflight, ratelimit
from relay.stores.base import Op, StoreUnavailable
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.support.redisproc import RedisServer

DOMAINS = {d.name: d for d in (audit.DOMAIN, idempotency.DOMAIN, inflight.DOMAIN, ratelimit.DOMAIN)}
KEYS = KeySpace("t", "dev")


class Counting(redis.Connection):
    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        Counting.sends += 1
        super().send_packed_command(command, check_health)


class Rig:
    def __init__(self, server: RedisServer, fallback: bool, phase: str = "redis-primary",
                 reset_timeout_s: float = 30) -> None:
        self.server = server
        client = redis.Redis.from_url(server.url, decode_responses=True, connection_class=Counting,
                                      socket_timeout=0.1, socket_connect_timeout=0.1)
        self.memory = MemoryStore()
        self.breaker = GuardedBreaker(fail_max=100, reset_timeout=reset_timeout_s)
        self.redis = RedisStore(lambda: client, breaker=self.breaker,
                                socket_timeout_ms=100, connect_timeout_ms=100, op_deadline_ms=300)
        plan = replace(PRESETS[phase], fallback_to_memory=fallback)
        self.router = StoreRouter(KEYS, DOMAINS, {"memory": self.memory, "redis": self.redis},
                                  {name: plan for name in DOMAINS})

    def sends(self) -> int:
        return Counting.sends


@pytest.fixture
def rig(redis_server: RedisServer) -> Iterator[Rig]:
    built = Rig(redis_server, fallback=False)
    with built.router.bound():
        built.router.store("inflight").get("warm-up")  # opens the connection
    yield built
    built.router.close()


def test_deferred_writes_go_out_with_the_next_call_and_are_read_back(rig: Rig) -> None:
    with rig.router.bound():
        store = rig.router.store("inflight")
        before = rig.sends()
        store.defer_set("c1", {"commandId": "c1", "userId": "u", "machineId": "m", "kind": "status",
                               "createdAtMs": 1})
        store.defer_index_add(inflight.INDEX, {"c1": 1.0})
        assert rig.sends() == before  # nothing sent yet
        assert store.get("c1")["commandId"] == "c1"  # the read carries the writes: one round trip
        assert rig.sends() == before + 1
    assert rig.redis.index_range("t:dev:{inflight}:#created") == [("c1", 1.0)]


def test_prefetched_reads_ride_along_and_writes_make_them_stale(rig: Rig) -> None:
    rig.redis.set("t:dev:idempotency:m1", '{"version":1,"updatedAt":"2026-01-01T00:00:00.000Z",'
                                          '"data":{"reservedAtMs":1}}')
    with rig.router.bound():
        keys = rig.router.store("idempotency")
        limits = rig.router.store("ratelimit")
        before = rig.sends()
        keys.prefetch("m1")
        assert limits.incr("u1", 1, 60_000) == 1
        assert keys.get("m1") == {"reservedAtMs": 1}
        assert rig.sends() == before + 1
        keys.delete("m1")
        assert keys.get("m1") is None  # not the cached answer
        assert rig.sends() == before + 3


def _gets(rig: Rig) -> int:
    with rig.server.client() as inspect:
        return int(inspect.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_a_read_of_a_prefetched_key_is_sent_once(rig: Rig) -> None:
    rig.redis.set("t:dev:idempotency:m1", '{"version":1,"updatedAt":"2026-01-01T00:00:00.000Z",'
                                          '"data":{"reservedAtMs":1}}')
    with rig.router.bound():
        keys = rig.router.store("idempotency")
        sends, gets = rig.sends(), _gets(rig)
        keys.prefetch("m1", "m2")
        assert keys.get("m1") == {"reservedAtMs": 1}  # carries the queue, its own prefetch included
        assert keys.get("m2") is None and keys.get("m1") == {"reservedAtMs": 1}  # both answered already
        assert rig.sends() == sends + 1
        assert _gets(rig) == gets + 2


def test_a_write_queued_after_a_prefetch_of_its_key_is_what_later_reads_see(rig: Rig) -> None:
    rig.redis.set("t:dev:idempotency:m1", '{"version":1,"updatedAt":"2026-01-01T00:00:00.000Z",'
                                          '"data":{"reservedAtMs":1}}')
    with rig.router.bound():
        keys = rig.router.store("idempotency")
        keys.prefetch("m1")
        keys.defer_set("m1", {"reservedAtMs": 2})
        assert keys.get("m1") == {"reservedAtMs": 2}
        assert keys.get("m1") == {"reservedAtMs": 2}  # not the prefetch's answer from before the write


def test_the_end_of_the_scope_flushes(rig: Rig) -> None:
    with rig.router.bound():
        rig.router.store("idempotency").defer_set("late", {"reservedAtMs": 2})
    assert rig.redis.get("t:dev:idempotency:late") is not None


def test_a_failed_flush_without_fallback_raises(rig: Rig) -> None:
    with rig.router.bound():
        store = rig.router.store("idempotency")
        store.defer_set("x", {"reservedAtMs": 3})
        rig.server.pause()
        try:
            with pytest.raises(StoreUnavailable):
                store.flush()
        finally:
            rig.server.resume()


def test_a_failed_flush_with_fallback_goes_to_memory_and_the_journal(redis_server: RedisServer) -> None:
    rig = Rig(redis_server, fallback=True)
    try:
        with rig.router.bound():
            store = rig.router.store("idempotency")
            store.get("warm-up")
            store.defer_set("x", {"reservedAtMs": 3})
            rig.server.pause()
            try:
                store.flush()
            finally:
                rig.server.resume()
        assert rig.memory.get("t:dev:idempotency:x") is not None
        assert rig.router.journal.pending() == {"idempotency": 1}
    finally:
        rig.router.close()


def test_a_failed_round_trip_writes_its_follow_up_to_memory_with_the_call_it_follows(
        redis_server: RedisServer) -> None:
    """Redis paused under an audit write with its index entry following: the record and the entry
    both reach memory and the journal, as any queued write and the call that carried it do."""
    rig = Rig(redis_server, fallback=True)
    try:
        with rig.router.bound():
            store = rig.router.store("audit")
            store.get("warm-up")
            record = audit.apply_event(None, {"commandId": "c1", "timestamp": "2026-11-27T10:00:00.000Z",
                                              "status": "created"}, 10)
            rig.server.pause()
            try:
                written, _ = store.update_then_claim("c1", lambda _: record, None, then=lambda data: (
                    store.index_add_capped_op("updated", {data["commandId"]: 1.0}, 10)))
            finally:
                rig.server.resume()
        assert written == record
        assert rig.memory.get(KEYS.key("audit", "c1", colocated=True)) is not None
        assert rig.memory.index_range(KEYS.index_key("audit", "updated", colocated=True)) == [("c1", 1.0)]
        assert rig.router.journal.pending() == {"audit": 2}
    finally:
        rig.router.close()


@pytest.fixture
def rampdown(redis_server: RedisServer) -> Iterator[Rig]:
    """Redis authoritative with memory mirrored and falling back, the breaker's reset timeout short."""
    built = Rig(redis_server, fallback=True, phase="rampdown", reset_timeout_s=0.3)
    yield built
    built.router.close()


def test_a_unit_of_work_asks_a_refusing_backend_once_and_counts_every_refused_call(
    rampdown: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusals = []
    ask = rampdown.redis.refuses_calls
    monkeypatch.setattr(rampdown.redis, "refuses_calls", lambda: refusals.append(1) or ask())
    rampdown.breaker.open()
    with rampdown.router.bound():
        store = rampdown.router.store("idempotency")
        store.set("a", {"reservedAtMs": 1})
        store.set("b", {"reservedAtMs": 2})
        assert store.get("a") == {"reservedAtMs": 1}
        assert len(refusals) == 1 and rampdown.breaker.rejected == 1
    assert rampdown.breaker.rejected == 3
    assert rampdown.redis.counters.snapshot()["errors"] == 3
    assert rampdown.router.journal.pending() == {"idempotency": 2}
    with rampdown.router.bound():
        rampdown.router.store("idempotency").get("a")
    assert len(refusals) == 2 and rampdown.breaker.rejected == 4


def test_a_refusal_holds_for_the_rest_of_the_unit_of_work_and_the_next_one_makes_the_trial(
    rampdown: Rig
) -> None:
    rampdown.breaker.open()
    with rampdown.router.bound():
        store = rampdown.router.store("idempotency")
        store.set("a", {"reservedAtMs": 1})
        time.sleep(0.4)  # past the reset timeout: the breaker would let a trial through now
        sends = rampdown.sends()
        store.set("b", {"reservedAtMs": 2})
        assert rampdown.sends() == sends and rampdown.breaker.current_state == "open"
    with rampdown.router.bound():
        assert rampdown.router.store("idempotency").get("b") == {"reservedAtMs": 2}
    assert rampdown.sends() > sends and rampdown.breaker.current_state == "closed"
    assert rampdown.redis.get("t:dev:idempotency:b") is not None  # written back before the read


def test_a_backend_that_starts_refusing_within_a_unit_of_work_is_asked_until_it_does(rampdown: Rig) -> None:
    with rampdown.router.bound():
        store = rampdown.router.store("idempotency")
        store.set("a", {"reservedAtMs": 1})
        assert rampdown.redis.get("t:dev:idempotency:a") is not None
        rampdown.breaker.open()
        store.set("b", {"reservedAtMs": 2})
    with rampdown.server.client() as inspect:
        assert inspect.get("t:dev:idempotency:b") is None
    assert rampdown.memory.get("t:dev:idempotency:b") is not None
    assert rampdown.breaker.rejected == 1


def test_the_recorder_returns_each_call_as_an_op_and_makes_each_operation_once() -> None:
    recorder = Recorder()
    assert recorder.get("k") == Op("get", ("k",))
    record = recorder.__dict__["get"]
    assert recorder.set("k", "v", 5) == Op("set", ("k", "v", 5))
    assert recorder.get("j") == Op("get", ("j",)) and recorder.get is record


COMMAND = {"commandId": "c1", "userId": "u", "machineId": "m", "kind": "status", "createdAtMs": 1}


def _event(status: str, second: int) -> dict[str, Any]:
    return {"commandId": "c1", "timestamp": f"2026-01-01T00:00:0{second}.000Z", "status": status}


def _answered(current: Any) -> Any:
    return audit.apply_event(current, _event("agent_ok", 2), 10)


def _command_sent(store: Any) -> None:
    """``c1`` in flight and audited as sent, in ``store`` (a backend) under the rig's keys."""
    commands = DomainStore(store, KEYS, inflight.DOMAIN)
    commands.set("c1", COMMAND)
    commands.index_add(inflight.INDEX, {"c1": 1.0})
    DomainStore(store, KEYS, audit.DOMAIN).set("c1", audit.apply_event(None, _event("sent_to_agent", 1), 10))


def test_an_answer_audited_and_its_command_claimed_take_one_round_trip_after_the_reads(rig: Rig) -> None:
    _command_sent(rig.redis)
    with rig.router.bound():
        records, commands = rig.router.store("audit"), rig.router.store("inflight")
        before = rig.sends()
        records.prefetch("c1")
        claimable = commands.claimable("c1", inflight.INDEX)  # carries both reads
        assert claimable is not None and claimable.entry.data == COMMAND
        record, claimed = records.update_then_claim("c1", _answered, claimable)
        assert claimed and record["status"] == "agent_ok"
        assert rig.sends() == before + 2
    assert rig.redis.get("t:dev:{inflight}:c1") is None
    assert rig.redis.index_range("t:dev:{inflight}:#created") == []
    assert '"agent_ok"' in (rig.redis.get("t:dev:{audit}:c1") or "")


def test_an_answer_that_loses_the_race_claims_nothing_until_its_write_succeeds(rig: Rig) -> None:
    _command_sent(rig.redis)
    changes: list[Any] = []

    def answered(current: Any) -> Any:
        changes.append(current)
        if len(changes) == 1:
            # Another writer changes the record between this read and this write.
            DomainStore(rig.redis, KEYS, audit.DOMAIN).update("c1", lambda r: audit.apply_event(
                r, _event("result_push_ok", 3), 10))
            assert rig.redis.get("t:dev:{inflight}:c1") is not None
        return _answered(current)

    with rig.router.bound():
        claimable = rig.router.store("inflight").claimable("c1", inflight.INDEX)
        record, claimed = rig.router.store("audit").update_then_claim("c1", answered, claimable)
    assert claimed and len(changes) == 2
    assert [e["status"] for e in record["events"]] == ["sent_to_agent", "result_push_ok", "agent_ok"]
    assert rig.redis.get("t:dev:{inflight}:c1") is None


def test_an_answer_memory_serves_during_an_outage_is_journalled_by_each_domain(redis_server: RedisServer) -> None:
    rig = Rig(redis_server, fallback=True)
    try:
        _command_sent(rig.memory)
        rig.breaker.open()
        with rig.router.bound():
            claimable = rig.router.store("inflight").claimable("c1", inflight.INDEX)
            _, claimed = rig.router.store("audit").update_then_claim("c1", _answered, claimable)
        assert claimed
        assert rig.memory.get("t:dev:{inflight}:c1") is None
        assert rig.router.journal.pending() == {"audit": 1, "inflight": 2}
    finally:
        rig.router.close()


def test_an_answer_whose_command_is_routed_otherwise_is_written_then_claimed_by_each_domain(
        redis_server: RedisServer) -> None:
    """The audit record on Redis, the in-flight record still memory's with Redis mirrored: no
    single script can do both, so the write goes first and the claim follows by its own domain's
    rules, mirror included."""
    rig = Rig(redis_server, fallback=False)
    plans = {name: PRESETS["redis-primary"] for name in DOMAINS}
    plans["inflight"] = PRESETS["dual-write"]
    router = StoreRouter(KEYS, DOMAINS, {"memory": rig.memory, "redis": rig.redis}, plans)
    try:
        with router.bound():
            commands = router.store("inflight")
            commands.set("c1", COMMAND)
            commands.index_add(inflight.INDEX, {"c1": 1.0})
            router.store("audit").set("c1", audit.apply_event(None, _event("sent_to_agent", 1), 10))
        assert rig.redis.get("t:dev:{inflight}:c1") is not None
        with router.bound():
            claimable = router.store("inflight").claimable("c1", inflight.INDEX)
            record, claimed = router.store("audit").update_then_claim("c1", _answered, claimable)
        assert claimed and record["status"] == "agent_ok"
        for backend in (rig.memory, rig.redis):
            assert backend.get("t:dev:{inflight}:c1") is None
            assert backend.index_range("t:dev:{inflight}:#created") == []
        assert '"agent_ok"' in (rig.redis.get("t:dev:{audit}:c1") or "")
    finally:
        router.close()
