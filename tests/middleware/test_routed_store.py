"""RoutedStore semantics per phase: authority, mirroring, fallback, write-back, shadow, copies."""
from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from config.phases import PRESETS, DomainPlan
from middleware.breaker import GuardedBreaker
from middleware.routed_store import RoutedStore
from middleware.routing import StoreRouter
from middleware.shadow import ShadowComparer
from middleware.writeback import Reconciler, WriteBackJournal, copy_newer, sync_key
from relay.domains import idempotency
from relay.stores.base import StoreError, StoreUnavailable
from relay.stores.envelope import iso_ms
from relay.stores.keys import KeySpace, watermark_key
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.support.redisproc import RedisServer

PREFIX = "t:dev:{audit}:"


class Recorder:
    """A StoreObserver that counts what it is told."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, ...]] = Counter()

    def operation(self, domain: str, backend: str, op: str, outcome: str, seconds: float) -> None:
        self.events["op", backend, op, outcome] += 1

    def fallback(self, domain: str, op: str, kind: str) -> None:
        self.events["fallback", op, kind] += 1

    def refused(self, domain: str, backend: str, op: str, kind: str, seconds: float, mirror_skipped: bool) -> None:
        """Counted as itself and as the four events it stands for."""
        self.events["refused", backend, op, kind] += 1
        self.operation(domain, backend, op, "rejected", 0.0)
        self.fallback(domain, op, kind)
        self.operation(domain, "memory", op, "ok", seconds)
        if mirror_skipped:
            self.secondary_skipped(domain, op)

    def secondary_failure(self, domain: str, op: str) -> None:
        self.events["secondary_failure", op] += 1

    def secondary_skipped(self, domain: str, op: str) -> None:
        self.events["secondary_skipped", op] += 1

    def shadow(self, domain: str, outcome: str, key: Optional[str] = None, detail: Optional[str] = None) -> None:
        self.events["shadow", outcome] += 1

    def writeback(self, domain: str, outcome: str) -> None:
        self.events["writeback", outcome] += 1


def envelope(data: Any, at_ms: int) -> str:
    return json.dumps({"version": 1, "updatedAt": iso_ms(at_ms), "data": data})


class Rig:
    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.memory = MemoryStore()
        self.redis = RedisStore(server.url, breaker=GuardedBreaker(fail_max=100, reset_timeout=0.05),
                                socket_timeout_ms=100, connect_timeout_ms=100, op_deadline_ms=300)
        self.backends = {"memory": self.memory, "redis": self.redis}
        self.observer = Recorder()
        self.journal = WriteBackJournal()
        self.shadow = ShadowComparer(self.observer)
        self.reconciler = Reconciler(self.backends, self.journal, self.observer, lambda domain: PREFIX)

    def routed(self, phase: str, **changes: Any) -> RoutedStore:
        plan: DomainPlan = PRESETS[phase]
        if changes:
            plan = DomainPlan(**{**plan.__dict__, **changes})
        return RoutedStore("audit", plan, self.backends, self.observer, self.shadow, self.journal,
                           sample=lambda: 0.0)


@pytest.fixture
def rig(redis_server: RedisServer) -> Iterator[Rig]:
    rig = Rig(redis_server)
    yield rig
    rig.redis.close()


def test_dual_write_mirrors_to_redis_and_reads_memory(rig: Rig) -> None:
    store = rig.routed("dual-write")
    store.set(PREFIX + "a", envelope({"n": 1}, 1000))
    assert rig.memory.get(PREFIX + "a") == rig.redis.get(PREFIX + "a")
    rig.redis.delete(PREFIX + "a")
    assert store.get(PREFIX + "a") is not None  # reads stay on memory


@pytest.mark.parametrize("phase, changes", [("dual-write", {}), ("redis-read", {}), ("shadow", {}),
                                             ("dual-write", {"read_preference": "redis"})])
def test_a_local_key_is_written_and_read_on_the_authoritative_backend_alone(
        rig: Rig, phase: str, changes: dict[str, str]) -> None:
    """A ``#local:`` key (the audit linking watermark) vouches for its own backend: mirrored, it
    would vouch on the other for links that backend never made. It is read where it is written,
    also where the other reads go elsewhere."""
    store = rig.routed(phase, **changes)
    shared = PREFIX + "#updated"
    local = watermark_key(shared)
    store.index_add(local, {"through": 5000.0})
    store.index_add(shared, {"c1": 5000.0})
    authority, other = ((rig.memory, rig.redis) if PRESETS[phase].backend == "memory"
                        else (rig.redis, rig.memory))
    assert authority.index_range(local) == [("through", 5000.0)] and other.index_range(local) == []
    assert other.index_range(shared) == [("c1", 5000.0)]
    assert store.index_range(local) == [("through", 5000.0)]


def test_a_local_key_falls_back_to_memory_with_its_writes_and_stays_there(rig: Rig) -> None:
    """Redis down in ``rampdown``: the watermark is written and read on memory, and the write-back
    carries the index written beside it to Redis, not the watermark."""
    store = rig.routed("rampdown")
    shared = PREFIX + "#updated"
    local = watermark_key(shared)
    rig.server.stop()
    store.index_add(local, {"through": 5000.0})
    store.index_add(shared, {"c1": 5000.0})
    assert store.index_range(local) == [("through", 5000.0)]
    assert rig.memory.index_range(local) == [("through", 5000.0)]
    rig.server.start()
    rig.reconciler.run_once()
    assert rig.redis.index_range(shared) == [("c1", 5000.0)]
    assert rig.redis.index_range(local) == []


def test_failed_secondary_write_is_counted_and_never_fails_the_caller(rig: Rig) -> None:
    store = rig.routed("dual-write")
    rig.server.stop()
    store.set(PREFIX + "a", envelope({"n": 1}, 1000))
    assert rig.memory.get(PREFIX + "a") is not None
    assert rig.observer.events["secondary_failure", "set"] == 1


def test_failed_authoritative_write_skips_the_secondary_and_raises_without_fallback(rig: Rig) -> None:
    store = rig.routed("rampdown", fallback_to_memory=False)
    rig.server.stop()
    with pytest.raises(StoreUnavailable):
        store.set(PREFIX + "a", envelope({"n": 1}, 1000))
    assert rig.memory.get(PREFIX + "a") is None
    assert rig.observer.events["secondary_skipped", "set"] == 1


def test_fallback_write_is_written_back_after_recovery_without_overwriting_newer(rig: Rig) -> None:
    store = rig.routed("redis-primary", fallback_to_memory=True)
    rig.server.pause()
    try:
        store.set(PREFIX + "new", envelope({"v": "during outage"}, 2000))
        store.set(PREFIX + "kept", envelope({"v": "stale"}, 3000))
        store.index_add(PREFIX + "#updated", {"new": 2000.0})
        assert rig.observer.events["fallback", "set", "write"] == 2
        assert store.get(PREFIX + "new") is not None  # read falls back to memory too
        assert rig.observer.events["fallback", "get", "read"] == 1
        rig.reconciler.run_once()  # Redis does not answer: nothing is taken from the journal
        assert rig.journal.pending() == {"audit": 3}
    finally:
        rig.server.resume()
    # A write that timed out may still be applied when the server wakes up; let that settle,
    # then play another instance that wrote a newer value during the outage.
    time.sleep(0.1)
    rig.redis.set(PREFIX + "kept", envelope({"v": "redis-newer"}, 5000))
    rig.reconciler.run_once()
    assert json.loads(rig.redis.get(PREFIX + "new"))["data"] == {"v": "during outage"}
    assert json.loads(rig.redis.get(PREFIX + "kept"))["data"] == {"v": "redis-newer"}
    assert rig.redis.index_range(PREFIX + "#updated") == [("new", 2000.0)]
    assert rig.journal.pending() == {}
    assert rig.observer.events["writeback", "kept_newer"] >= 1


def test_read_fallback_on_redis_timeout(rig: Rig) -> None:
    store = rig.routed("redis-read")
    store.set(PREFIX + "a", envelope({"n": 1}, 1000))
    rig.server.pause()
    try:
        assert json.loads(store.get(PREFIX + "a"))["data"] == {"n": 1}
    finally:
        rig.server.resume()
    assert rig.observer.events["fallback", "get", "read"] == 1
    assert rig.observer.events["op", "redis", "get", "timeout"] >= 1


def test_atomic_operations_are_decided_by_the_authoritative_backend(rig: Rig) -> None:
    rig.memory.set(PREFIX + "k", "only in memory")
    store = rig.routed("redis-read")
    assert store.set_if_absent(PREFIX + "k", envelope({"n": 1}, 1)) is True
    assert rig.memory.get(PREFIX + "k") == rig.redis.get(PREFIX + "k")
    assert store.set_if_absent(PREFIX + "k", envelope({"n": 2}, 2)) is False
    current = rig.redis.get(PREFIX + "k")
    assert store.compare_and_set(PREFIX + "k", current, envelope({"n": 3}, 3)) is True
    assert rig.memory.get(PREFIX + "k") == envelope({"n": 3}, 3)
    assert store.compare_and_delete(PREFIX + "k", envelope({"n": 3}, 3)) is True
    assert rig.memory.get(PREFIX + "k") is None
    assert store.incr(PREFIX + "c", 2, 1000) == 2 and rig.memory.incr(PREFIX + "c", 0) == 2


def test_shadow_compare_detects_values_changed_behind_the_relays_back(rig: Rig) -> None:
    store = rig.routed("shadow")
    store.set(PREFIX + "same", envelope({"n": 1}, 1))
    store.set(PREFIX + "changed", envelope({"n": 1, "who": "relay"}, 1))
    store.set(PREFIX + "gone", envelope({"n": 1}, 1))
    rig.redis.set(PREFIX + "changed", envelope({"n": 1, "who": "someone else"}, 1))
    rig.redis.delete(PREFIX + "gone")
    for key in ("same", "changed", "gone"):
        store.get(PREFIX + key)
    rig.shadow.start()
    rig.shadow.drain()
    rig.shadow.stop()
    assert rig.shadow.counts["audit"] == {"match": 1, "different": 1, "missing": 1}
    sample = rig.shadow.mismatches()
    assert {m["outcome"] for m in sample} == {"different", "missing"}
    different = next(m for m in sample if m["outcome"] == "different")
    assert different["fields"] == ["data"] and "changed" not in json.dumps(sample)


def test_shadow_ignores_updated_at(rig: Rig) -> None:
    store = rig.routed("shadow")
    store.set(PREFIX + "a", envelope({"n": 1}, 1))
    rig.redis.set(PREFIX + "a", envelope({"n": 1}, 999))
    store.get(PREFIX + "a")
    rig.shadow.start()
    rig.shadow.drain()
    rig.shadow.stop()
    assert rig.shadow.counts["audit"] == {"match": 1}


def test_backfill_copies_memory_only_state_and_keeps_newer_redis_values(rig: Rig) -> None:
    rig.memory.set(PREFIX + "old", envelope({"v": "memory"}, 1000), 60_000)
    rig.memory.set(PREFIX + "both", envelope({"v": "memory, older"}, 1000))
    rig.memory.index_add(PREFIX + "#updated", {"old": 1000.0, "both": 1000.0})
    rig.redis.set(PREFIX + "both", envelope({"v": "redis, newer"}, 2000))
    progress = rig.reconciler.copy_domain("audit", "backfill")
    assert progress.state == "done" and progress.total == 3
    assert (progress.written, progress.kept_newer) == (2, 1)
    assert json.loads(rig.redis.get(PREFIX + "old"))["data"] == {"v": "memory"}
    assert 0 < rig.redis.ttl_ms(PREFIX + "old") <= 60_000
    assert json.loads(rig.redis.get(PREFIX + "both"))["data"] == {"v": "redis, newer"}
    assert dict(rig.redis.index_range(PREFIX + "#updated")) == {"old": 1000.0, "both": 1000.0}


class RefusingWrites:
    """A backend whose compare-and-set of ``key`` fails ``times`` times as an unreachable Redis
    would; every other call goes to ``store``."""

    def __init__(self, store: RedisStore, key: str, times: int) -> None:
        self._store, self._key, self.refusals_left = store, key, times
        self.refused = 0

    def compare_and_set(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int] = None) -> bool:
        if key == self._key and self.refusals_left:
            self.refusals_left -= 1
            self.refused += 1
            raise StoreUnavailable("refused")
        return self._store.compare_and_set(key, expected, value, ttl_ms)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _copy_rig(rig: Rig, refusals: int) -> tuple[Reconciler, RefusingWrites, list[str]]:
    rig.memory.set(PREFIX + "a", envelope({"v": "a"}, 1000))
    rig.memory.set(PREFIX + "b", envelope({"v": "b"}, 1000))
    target = RefusingWrites(rig.redis, PREFIX + "b", refusals)
    finished: list[str] = []
    reconciler = Reconciler({"memory": rig.memory, "redis": target}, rig.journal, rig.observer,  # type: ignore[dict-item]
                            lambda domain: PREFIX, on_copy_done=finished.append)
    reconciler.schedule_copy("audit", "backfill")
    return reconciler, target, finished


def test_a_copy_that_failed_for_some_keys_runs_again_on_the_next_pass_and_finishes(rig: Rig) -> None:
    reconciler, target, finished = _copy_rig(rig, refusals=1)

    reconciler.run_once()
    first = reconciler.progress["audit"]
    assert (first.state, first.written, first.errors) == ("failed", 1, 1) and finished == []

    reconciler.run_once()
    second = reconciler.progress["audit"]
    assert (second.state, second.written, second.kept_newer) == ("done", 1, 1) and finished == ["audit"]
    assert json.loads(rig.redis.get(PREFIX + "b"))["data"] == {"v": "b"}


def test_a_copy_that_keeps_failing_is_tried_once_a_pass_until_a_newer_copy_replaces_it(rig: Rig) -> None:
    reconciler, target, finished = _copy_rig(rig, refusals=1_000)

    for passes in (1, 2, 3):
        reconciler.run_once()
        assert target.refused == passes and reconciler.progress["audit"].state == "failed"
    reconciler.schedule_copy("audit", "warmup")
    reconciler.run_once()
    assert reconciler.progress["audit"].direction == "warmup" and reconciler.progress["audit"].state == "done"
    reconciler.run_once()
    assert target.refused == 3 and finished == ["audit"]


def test_a_copy_whose_source_cannot_be_listed_is_tried_once_a_pass(rig: Rig) -> None:
    """The whole copy failing (the keys cannot even be listed) is retried on the next pass, not in a
    loop within the pass."""
    listings: list[str] = []

    class Unlisted:
        def scan_keys(self, prefix: str) -> list[str]:
            listings.append(prefix)
            assert len(listings) <= 2, "copied again within the pass"
            raise StoreUnavailable("refused")

        def __getattr__(self, name: str) -> Any:
            return getattr(rig.memory, name)

    reconciler = Reconciler({"memory": Unlisted(), "redis": rig.redis}, rig.journal,  # type: ignore[dict-item]
                            rig.observer, lambda domain: PREFIX)
    reconciler.schedule_copy("audit", "backfill")
    for passes in (1, 2):
        reconciler.run_once()
        assert len(listings) == passes and reconciler.progress["audit"].state == "failed"


def test_a_copy_queued_again_during_a_pass_replaces_the_one_the_pass_was_about_to_run(rig: Rig) -> None:
    """A phase change while a pass copies another domain: the domain's older copy is not run after
    the newer one was queued (its end would stop the newer plan's pulling before that copy ran)."""
    rig.memory.set(PREFIX + "a", envelope({"v": "a"}, 1000))
    finished: list[str] = []
    reconciler = Reconciler(rig.backends, rig.journal, rig.observer, lambda domain: PREFIX,
                            on_copy_done=finished.append)
    copy_domain = reconciler.copy_domain
    ran: list[tuple[str, str]] = []

    def copying(domain: str, direction: str) -> Any:
        ran.append((domain, direction))
        if domain == "audit":
            reconciler.schedule_copy("idempotency", "warmup")
        return copy_domain(domain, direction)

    reconciler.copy_domain = copying  # type: ignore[method-assign]
    reconciler.schedule_copy("audit", "backfill")
    reconciler.schedule_copy("idempotency", "backfill")
    reconciler.run_once()
    assert ran == [("audit", "backfill")] and finished == ["audit"]
    assert reconciler.progress["idempotency"].state == "queued"
    reconciler.run_once()
    assert ran[1:] == [("idempotency", "warmup")] and finished == ["audit", "idempotency"]


def test_warmup_copies_redis_state_into_memory(rig: Rig) -> None:
    rig.redis.set(PREFIX + "a", envelope({"v": 1}, 1000))
    progress = rig.reconciler.copy_domain("audit", "warmup")
    assert progress.written == 1
    assert rig.memory.get(PREFIX + "a") == rig.redis.get(PREFIX + "a")


def test_copy_never_overwrites_a_newer_target(rig: Rig) -> None:
    rig.memory.set(PREFIX + "a", envelope({"v": "old"}, 1000))
    rig.redis.set(PREFIX + "a", envelope({"v": "new"}, 1001))
    assert copy_newer(rig.memory, rig.redis, PREFIX + "a") == "kept_newer"
    assert json.loads(rig.redis.get(PREFIX + "a"))["data"] == {"v": "new"}


def test_a_local_key_is_neither_copied_nor_repaired(rig: Rig) -> None:
    """The audit linking watermark describes its own backend's value indexes: a copy would claim
    links the target never made."""
    key = watermark_key(PREFIX + "#updated")
    rig.memory.index_add(key, {"through": 5000.0})
    rig.redis.index_add(key, {"through": 1000.0})
    assert copy_newer(rig.memory, rig.redis, key) == "skipped"
    assert sync_key(rig.memory, rig.redis, key) == "skipped"
    assert rig.redis.index_range(key) == [("through", 1000.0)]
    rig.reconciler.copy_domain("audit", "backfill")
    assert rig.redis.index_range(key) == [("through", 1000.0)]


def test_index_members_copied_below_the_target_s_watermark_lower_it(rig: Rig) -> None:
    """Records written back after an outage may be older than what the target's watermark vouches
    for (another process linked the target meanwhile): the copy lowers it, so they are linked next."""
    index = PREFIX + "#updated"
    mark = watermark_key(index)

    def linked_through(upto: float) -> None:
        rig.redis.watermark_begin(mark, upto)
        rig.redis.watermark_end(mark, upto)

    rig.redis.index_add(index, {"linked": 900.0})
    linked_through(1000)
    rig.memory.index_add(index, {"linked": 900.0, "in-the-outage": 700.0, "later": 1200.0})
    assert copy_newer(rig.memory, rig.redis, index) == "written"
    assert rig.redis.watermark(mark) == 699.5
    linked_through(2000)
    rig.memory.index_add(index, {"repaired": 800.0})
    assert sync_key(rig.memory, rig.redis, index) == "written"
    assert rig.redis.watermark(mark) == 799.5
    linked_through(3000)
    rig.memory.index_remove(index, ["in-the-outage"])
    assert copy_newer(rig.memory, rig.redis, index) == "written"  # members the target had: their records
    assert rig.redis.watermark(mark) == 799.5                     # may have changed at the same score


def test_a_write_back_copies_records_before_indexes(rig: Rig) -> None:
    """An index entry copied over lowers the watermark; a pass that then reads its record finds it."""
    rig.journal.record("audit", [PREFIX + "#updated", PREFIX + "c2", PREFIX + "#userId.u1", PREFIX + "c1"])
    assert rig.journal.keys() == {"audit": [PREFIX + "c1", PREFIX + "c2", PREFIX + "#updated",
                                            PREFIX + "#userId.u1"]}


# -- switching plans through the router ------------------------------------------------------------


def make_router(rig: Rig, phase: str) -> StoreRouter:
    plans = {name: PRESETS[phase] for name in ("idempotency",)}
    return StoreRouter(KeySpace("t", "dev"), {"idempotency": idempotency.DOMAIN}, rig.backends, plans,
                       observer=rig.observer)


def reserve(router: StoreRouter, msg_id: str) -> bool:
    with router.bound():
        return router.store("idempotency").set_if_absent(msg_id, {"reservedAtMs": 1}, 60_000)


def test_rollback_to_memory_sees_reservations_before_the_warmup_finishes(rig: Rig) -> None:
    router = make_router(rig, "redis-primary")
    assert reserve(router, "m-1") is True
    assert rig.memory.scan_keys("") == []
    router.apply_plans({"idempotency": PRESETS["memory"]})
    assert reserve(router, "m-1") is False  # pulled from Redis before memory decided
    assert reserve(router, "m-2") is True
    router.reconciler.run_once()
    assert router.reconciler.progress["idempotency"].state == "done"
    assert router.snapshot().store("idempotency").store._pull_from is None  # type: ignore[attr-defined]
    assert rig.redis.get("t:dev:idempotency:m-1") is not None  # nothing was flushed


def test_jump_to_redis_authority_sees_memory_state_before_the_backfill_finishes(rig: Rig) -> None:
    router = make_router(rig, "memory")
    assert reserve(router, "m-1") is True
    router.apply_plans({"idempotency": PRESETS["redis-primary"]})
    assert reserve(router, "m-1") is False
    router.reconciler.run_once()
    assert router.reconciler.progress["idempotency"].direction == "backfill"
    assert rig.redis.get("t:dev:idempotency:m-1") is not None


def test_mirror_starting_again_warms_memory(rig: Rig) -> None:
    router = make_router(rig, "redis-primary")
    reserve(router, "m-1")
    router.apply_plans({"idempotency": PRESETS["rampdown"]})
    assert router.reconciler.progress["idempotency"].direction == "warmup"
    router.reconciler.run_once()
    assert rig.memory.get("t:dev:idempotency:m-1") == rig.redis.get("t:dev:idempotency:m-1")


def test_failed_memory_mirror_under_redis_authority_is_counted(rig: Rig) -> None:
    full_memory = MemoryStore(max_keys=0)
    rig.backends["memory"] = full_memory
    store = rig.routed("redis-read")
    store.set(PREFIX + "a", envelope({"n": 1}, 1000))
    assert json.loads(rig.redis.get(PREFIX + "a"))["data"] == {"n": 1}
    assert full_memory.get(PREFIX + "a") is None
    assert rig.observer.events["secondary_failure", "set"] == 1


def test_a_write_between_read_and_shadow_read_is_not_a_mismatch(rig: Rig) -> None:
    store = rig.routed("shadow")
    store.set(PREFIX + "a", envelope({"n": 1}, 1))
    store.get(PREFIX + "a")  # queued with the old value, as a read before a compare-and-set is
    store.set(PREFIX + "a", envelope({"n": 2}, 2))
    rig.shadow.start()
    rig.shadow.drain()
    rig.shadow.stop()
    assert rig.shadow.counts["audit"] == {"match": 1}


def test_aa_mode_measures_the_noise_floor_on_one_backend(rig: Rig) -> None:
    store = rig.routed("memory", shadow_compare=True, shadow_mode="aa")
    store.set(PREFIX + "a", envelope({"n": 1}, 1))
    store.get(PREFIX + "a")
    store.get(PREFIX + "missing")
    rig.shadow.start()
    rig.shadow.drain()
    rig.shadow.stop()
    assert rig.shadow.counts["audit"] == {"match": 2}
    assert rig.redis.get(PREFIX + "a") is None


def test_while_the_breaker_refuses_a_domain_with_fallback_goes_straight_to_memory(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusing = RedisStore(rig.server.url, breaker=GuardedBreaker(fail_max=1, reset_timeout=60),
                          socket_timeout_ms=100, connect_timeout_ms=100, op_deadline_ms=300)
    try:
        assert refusing.ping()
        assert refusing.breaker is not None
        refusing.breaker.open()
        backends = {"memory": rig.memory, "redis": refusing}
        store = RoutedStore("audit", PRESETS["rampdown"], backends, rig.observer, journal=rig.journal)
        inspect = rig.server.client()
        commands_before = int(inspect.info("stats")["total_commands_processed"])

        claims: list[str] = []
        claim = rig.journal.claim
        monkeypatch.setattr(rig.journal, "claim", lambda domain, key, **kw: claims.append(key) or claim(domain, key, **kw))

        store.set(PREFIX + "k", envelope({"n": 0}, 900))
        store.set(PREFIX + "k", envelope({"n": 1}, 1000))
        assert store.get(PREFIX + "k") == envelope({"n": 1}, 1000)
        assert claims == []  # the journalled key is not settled towards a Redis that would refuse

        assert rig.memory.get(PREFIX + "k") == envelope({"n": 1}, 1000)
        assert rig.journal.keys() == {"audit": [PREFIX + "k"]}
        events = rig.observer.events
        assert events["op", "redis", "set", "rejected"] == 2 and events["op", "redis", "get", "rejected"] == 1
        assert events["fallback", "set", "write"] == 2 and events["fallback", "get", "read"] == 1
        assert events["secondary_skipped", "set"] == 2
        assert events["op", "memory", "set", "ok"] == 2 and events["op", "memory", "get", "ok"] == 1
        # each refused call was one report to the observer
        assert events["refused", "redis", "set", "write"] == 2 and events["refused", "redis", "get", "read"] == 1
        assert refusing.breaker.rejected == 3 and refusing.counters.snapshot()["errors"] == 3
        # nothing was sent to Redis (the INFO call itself is the one command counted)
        assert int(inspect.info("stats")["total_commands_processed"]) == commands_before + 1

        without_fallback = RoutedStore("audit", PRESETS["redis-primary"], backends, rig.observer, journal=rig.journal)
        with pytest.raises(StoreUnavailable):
            without_fallback.set(PREFIX + "other", envelope({"n": 2}, 1000))
    finally:
        refusing.close()


def test_a_refused_call_that_memory_fails_too_is_reported_event_by_event(rig: Rig) -> None:
    refusing = RedisStore(rig.server.url, breaker=GuardedBreaker(fail_max=1, reset_timeout=60),
                          socket_timeout_ms=100, connect_timeout_ms=100, op_deadline_ms=300)
    try:
        assert refusing.breaker is not None
        refusing.breaker.open()
        full = MemoryStore(max_keys=1)
        full.set(PREFIX + "taken", "x")
        store = RoutedStore("audit", PRESETS["rampdown"], {"memory": full, "redis": refusing}, rig.observer,
                            journal=rig.journal)
        with pytest.raises(StoreError):
            store.set(PREFIX + "k", envelope({"n": 0}, 900))
        events = rig.observer.events
        assert events["refused", "redis", "set", "write"] == 0
        assert events["op", "redis", "set", "rejected"] == 1 and events["secondary_skipped", "set"] == 1
        assert events["fallback", "set", "write"] == 1 and events["op", "memory", "set", "error"] == 1
        assert events["op", "memory", "set", "ok"] == 0
        assert rig.journal.keys() == {}  # nothing was written, so nothing waits for the write-back
    finally:
        refusing.close()


def test_with_memory_the_only_backend_each_call_goes_straight_to_it_and_is_reported(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryStore()
    observer = Recorder()
    journal = WriteBackJournal()

    def no_journal(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing can be journalled with one backend")

    monkeypatch.setattr(journal, "has", no_journal)
    monkeypatch.setattr(journal, "record", no_journal)
    store = RoutedStore("audit", PRESETS["memory"], {"memory": memory}, observer, ShadowComparer(observer), journal)

    store.set(PREFIX + "k", envelope({"n": 1}, 1000))
    assert store.set_if_absent(PREFIX + "k", "other") is False
    assert store.get(PREFIX + "k") == envelope({"n": 1}, 1000)
    store.index_add(PREFIX + "i", {"a": 1.0})
    assert store.index_range(PREFIX + "i") == [("a", 1.0)]
    assert store.delete(PREFIX + "k") == 1

    assert memory.get(PREFIX + "k") is None and memory.index_count(PREFIX + "i") == 1
    assert observer.events == Counter({("op", "memory", op, "ok"): 1 for op in
                                       ("set", "set_if_absent", "get", "index_add", "index_range", "delete")})
