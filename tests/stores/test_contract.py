"""The store contract: one suite, run unchanged against every backend.

``memory`` is MemoryStore on a fake clock; ``fakeredis`` is RedisStore over
fakeredis; ``redis`` is RedisStore over the real redis-server from conftest; ``redis-cluster`` is
RedisClusterStore over a local 3-primary Redis Cluster (conftest's ``redis_cluster``);
``routed-shadow`` and ``routed-redis-read`` are the migration's RoutedStore with
memory, respectively Redis, authoritative and the other backend mirrored.
Redis backends wait for short real TTLs; the memory backend moves its clock.
"""
from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import marshmallow
import pytest
from marshmallow import fields

from config.phases import PRESETS
from middleware.breaker import GuardedBreaker
from middleware.observer import NullObserver
from middleware.routed_store import RoutedStore
from relay.stores.base import DEFAULT_MAX_VALUE_BYTES, Claim, Op, Store, StoreError, StoreUnavailable, ValueTooLarge
from relay.stores.domain import Domain, DomainStore
from relay.stores.envelope import EnvelopeSchema
from relay.stores.keys import MAX_ESCAPED_ID, KeySpace, watermark_key
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from relay.stores.redis_cluster import RedisClusterStore
from tests.support.helpers import FakeClock, race

TTL = 200  # ms: short, so the real backends expire keys quickly, yet long enough to read back first
REDIS_SLACK_MS = 30  # added to real waits, for Redis' millisecond expiry granularity
THREADS = 8
KEYS = KeySpace("relay", "test")


@dataclass
class Backend:
    name: str
    store: Store
    #: Another store on the same backend, with different options (e.g. a value cap).
    make: Callable[..., Store]
    #: Let ``ms`` milliseconds pass for TTL purposes.
    elapse: Callable[[int], None]
    #: Every key the backend holds, as stored.
    raw_keys: Callable[[], list[str]]


@pytest.fixture(params=["memory", "fakeredis", "redis", "redis-cluster", "routed-shadow", "routed-redis-read"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    made: list[Store] = []

    def keep(store: Store) -> Store:
        made.append(store)
        return store

    def sleep(ms: int) -> None:
        time.sleep((ms + REDIS_SLACK_MS) / 1000)

    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        yield Backend(
            "memory", store, lambda **kw: MemoryStore(clock=clock, **kw), clock.advance, lambda: store.scan_keys("")
        )
        return
    if request.param.startswith("routed-"):
        # The routed store of a migration phase over real MemoryStore and RedisStore backends:
        # the guarantees must hold whichever backend is authoritative.
        redis_server = request.getfixturevalue("redis_server")
        phase = request.param.removeprefix("routed-")

        def make(**kw: Any) -> Store:
            backends = {"memory": MemoryStore(**kw),
                        "redis": keep(RedisStore(redis_server.url, breaker=GuardedBreaker(), **kw))}
            return RoutedStore("test", PRESETS[phase], backends, NullObserver(), sample=lambda: 1.0)

        inspect = redis_server.client()
        authority = PRESETS[phase].backend
        store = make()

        def raw_keys() -> list[str]:
            if authority == "redis":
                return sorted(inspect.keys("*"))
            return store._backends["memory"].scan_keys("")  # type: ignore[attr-defined]

        try:
            yield Backend(request.param, store, make, sleep, raw_keys)
        finally:
            for made_store in made:
                made_store.close()
            inspect.close()
        return
    if request.param == "fakeredis":
        server = request.getfixturevalue("fake_redis_server")

        def make(**kw: Any) -> Store:
            client = fakeredis.FakeRedis(server=server, decode_responses=True)
            return keep(RedisStore.from_client(client, breaker=GuardedBreaker(), **kw))

        inspect = fakeredis.FakeRedis(server=server, decode_responses=True)
    elif request.param == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()

        def make(**kw: Any) -> Store:
            return keep(RedisClusterStore(cluster.url, breaker=GuardedBreaker(), **kw))

        inspect = cluster.client()
    else:
        redis_server = request.getfixturevalue("redis_server")

        def make(**kw: Any) -> Store:
            return keep(RedisStore(redis_server.url, breaker=GuardedBreaker(), **kw))

        inspect = redis_server.client()
    try:
        yield Backend(request.param, make(), make, sleep, lambda: sorted(set(inspect.scan_iter())))
    finally:
        for store in made:
            store.close()
        inspect.close()


# -- set / get / delete / mget / mset ----------------------------------------------------------
def test_set_get_delete(backend: Backend) -> None:
    s = backend.store
    assert s.get("k") is None
    s.set("k", "one")
    assert s.get("k") == "one"
    s.set("k", "two")
    assert s.get("k") == "two"
    s.set("other", "x")
    assert s.delete("k", "other", "missing") == 2
    assert s.get("k") is None and s.get("other") is None
    assert s.delete() == 0


def test_empty_string_is_a_value(backend: Backend) -> None:
    backend.store.set("k", "")
    assert backend.store.get("k") == ""
    assert backend.store.set_if_absent("k", "x") is False


def test_mget_mset(backend: Backend) -> None:
    s = backend.store
    s.mset({"a": "1", "b": "2", "c": "3"})
    assert s.mget(["c", "missing", "a", "b"]) == ["3", None, "1", "2"]
    assert s.mget([]) == []
    s.mset({})
    assert backend.raw_keys() == ["a", "b", "c"]


@pytest.mark.parametrize("keys", [("a",), ("a", "b")], ids=["one key", "two keys"])
@pytest.mark.parametrize("through", ["mset", "execute"])
def test_mset_applies_the_ttl_to_every_key(backend: Backend, keys: tuple[str, ...], through: str) -> None:
    s = backend.store
    s.set("a", "old")
    items = {key: "new " + key for key in keys}
    if through == "execute":
        s.execute([Op("mset", (items, 60_000))])
    else:
        s.mset(items, ttl_ms=60_000)
    for key in keys:
        assert s.get(key) == items[key]
        assert 0 < s.ttl_ms(key) <= 60_000


def test_set_replaces_value_and_ttl(backend: Backend) -> None:
    s = backend.store
    s.set("k", "v", ttl_ms=60_000)
    assert 0 < s.ttl_ms("k") <= 60_000
    s.set("k", "w")
    assert s.ttl_ms("k") is None
    assert s.get("k") == "w"


def test_ttl_ms_is_none_for_missing_and_persistent_keys(backend: Backend) -> None:
    backend.store.set("persistent", "v")
    assert backend.store.ttl_ms("persistent") is None
    assert backend.store.ttl_ms("missing") is None


def test_wrong_kind_of_key_is_a_store_error(backend: Backend) -> None:
    backend.store.index_add("idx", {"m": 1})
    with pytest.raises(StoreError) as caught:
        backend.store.get("idx")
    assert not isinstance(caught.value, StoreUnavailable)


# -- expiry -----------------------------------------------------------------------------------
def test_expired_values_are_invisible_at_once(backend: Backend) -> None:
    s = backend.store
    s.set("k", "v", ttl_ms=TTL)
    s.mset({"m1": "1", "m2": "2"}, ttl_ms=TTL)
    s.set("keep", "v")
    assert s.get("k") == "v"
    backend.elapse(TTL)
    assert s.get("k") is None
    assert s.mget(["k", "m1", "m2", "keep"]) == [None, None, None, "v"]
    assert s.ttl_ms("k") is None
    assert s.delete("k", "m1") == 0
    assert s.compare_and_set("m2", "2", "x") is False


def test_expired_key_can_be_reserved_again(backend: Backend) -> None:
    s = backend.store
    assert s.set_if_absent("r", "first", ttl_ms=TTL) is True
    assert s.set_if_absent("r", "second", ttl_ms=TTL) is False
    assert s.compare_and_set("c", None, "first", ttl_ms=TTL) is True
    backend.elapse(TTL)
    assert s.set_if_absent("r", "third") is True
    assert s.compare_and_set("c", None, "again") is True
    assert s.mget(["r", "c"]) == ["third", "again"]


def test_incr_sets_the_ttl_only_when_it_creates_the_counter(backend: Backend) -> None:
    s = backend.store
    assert s.incr("n", 1, ttl_ms=TTL) == 1
    assert s.incr("n", 5, ttl_ms=60_000) == 6
    assert s.ttl_ms("n") <= TTL
    backend.elapse(TTL)
    assert s.incr("n", 1) == 1
    assert s.ttl_ms("n") is None
    assert s.incr("n", -3) == -2


def test_lock_expires(backend: Backend) -> None:
    s = backend.store
    assert s.acquire_lock("lock", "a", TTL) is True
    assert s.acquire_lock("lock", "b", TTL) is False
    backend.elapse(TTL)
    assert s.acquire_lock("lock", "b", TTL) is True
    assert s.release_lock("lock", "a") is False


# -- TTL and value validation -------------------------------------------------------------------
WRITES: dict[str, Callable[[Store, str, Any], Any]] = {
    "set": lambda s, k, ttl: s.set(k, "v", ttl),
    "mset": lambda s, k, ttl: s.mset({k: "v", k + "2": "v"}, ttl),
    "set_if_absent": lambda s, k, ttl: s.set_if_absent(k, "v", ttl),
    "compare_and_set": lambda s, k, ttl: s.compare_and_set(k, None, "v", ttl),
    "incr": lambda s, k, ttl: s.incr(k, 1, ttl),
    "acquire_lock": lambda s, k, ttl: s.acquire_lock(k, "token", ttl),
}
BAD_TTLS = [0, -1, 1.5, 100.0, "100", True]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
@pytest.mark.parametrize("write", WRITES)
def test_invalid_ttl_raises_before_writing(backend: Backend, write: str, ttl: Any) -> None:
    with pytest.raises(ValueError):
        WRITES[write](backend.store, "k", ttl)
    assert backend.raw_keys() == []


@pytest.mark.parametrize("ttl", BAD_TTLS + [None], ids=repr)
def test_extend_lock_rejects_invalid_ttl(backend: Backend, ttl: Any) -> None:
    s = backend.store
    assert s.acquire_lock("lock", "t", 60_000)
    with pytest.raises(ValueError):
        s.extend_lock("lock", "t", ttl)
    assert 0 < s.ttl_ms("lock") <= 60_000


def test_a_lock_needs_a_ttl(backend: Backend) -> None:
    with pytest.raises(ValueError):
        backend.store.acquire_lock("lock", "t", None)  # type: ignore[arg-type]
    assert backend.raw_keys() == []


@pytest.mark.parametrize("value", [b"bytes", 5, None, {"a": 1}], ids=repr)
def test_values_must_be_strings(backend: Backend, value: Any) -> None:
    with pytest.raises(TypeError):
        backend.store.set("k", value)
    with pytest.raises(TypeError):
        backend.store.mset({"a": "ok", "k": value})
    assert backend.raw_keys() == []


def test_value_cap_is_checked_before_any_write(backend: Backend) -> None:
    s = backend.make(max_value_bytes=64)
    s.set("fits", "x" * 64)
    writes: list[Callable[[], Any]] = [
        lambda: s.set("k", "x" * 65),
        lambda: s.set("k", "é" * 33),  # 33 characters, 66 bytes
        lambda: s.set_if_absent("k", "x" * 65),
        lambda: s.compare_and_set("k", None, "x" * 65),
        lambda: s.mset({"a": "small", "k": "x" * 65}),
    ]
    for write in writes:
        with pytest.raises(ValueTooLarge):
            write()
    assert s.mget(["k", "a", "fits"]) == [None, None, "x" * 64]


def test_default_cap_is_one_mebibyte(backend: Backend) -> None:
    s = backend.store
    assert s.max_value_bytes == DEFAULT_MAX_VALUE_BYTES == 1024 * 1024
    s.set("big", "x" * DEFAULT_MAX_VALUE_BYTES)
    assert len(s.get("big")) == DEFAULT_MAX_VALUE_BYTES
    with pytest.raises(ValueTooLarge):
        s.set("bigger", "x" * (DEFAULT_MAX_VALUE_BYTES + 1))
    assert s.get("bigger") is None


# -- compare-and-set / compare-and-delete ---------------------------------------------------------
def test_compare_and_set(backend: Backend) -> None:
    s = backend.store
    assert s.compare_and_set("k", None, "one") is True
    assert s.compare_and_set("k", None, "two") is False
    assert s.compare_and_set("k", "wrong", "two") is False
    assert s.compare_and_set("k", "one", "two", ttl_ms=60_000) is True
    assert s.get("k") == "two"
    assert 0 < s.ttl_ms("k") <= 60_000
    assert s.compare_and_set("k", "two", "three") is True
    assert s.ttl_ms("k") is None
    s.set("empty", "")
    assert s.compare_and_set("empty", None, "x") is False
    assert s.compare_and_set("empty", "", "x") is True


def test_compare_and_delete(backend: Backend) -> None:
    s = backend.store
    s.set("k", "v")
    assert s.compare_and_delete("k", "other") is False
    assert s.get("k") == "v"
    assert s.compare_and_delete("k", "v") is True
    assert s.get("k") is None
    assert s.compare_and_delete("k", "v") is False


def test_compare_and_set_then_claim_claims_only_after_its_write(backend: Backend) -> None:
    s = backend.store
    claim = Claim("claimed", "v", "claimed-index", "m")
    s.set("claimed", "v")
    s.index_add("claimed-index", {"m": 1.0, "other": 2.0})

    def members() -> list[str]:
        return [m for m, _ in s.index_range("claimed-index", newest_first=False)]

    assert s.compare_and_set_then_claim("k", "stale", "one", None, claim) == (False, False)
    assert s.get("k") is None and s.get("claimed") == "v" and members() == ["m", "other"]

    assert s.compare_and_set_then_claim("k", None, "one", 60_000, claim) == (True, True)
    assert s.get("k") == "one" and 0 < (s.ttl_ms("k") or 0) <= 60_000
    assert s.get("claimed") is None and members() == ["other"]

    # The claimed record changed meanwhile: the write stands, the record stays, its index entry goes.
    s.set("claimed", "changed")
    s.index_add("claimed-index", {"m": 3.0})
    assert s.compare_and_set_then_claim("k", "one", "two", None, claim) == (True, False)
    assert s.get("k") == "two" and s.ttl_ms("k") is None
    assert s.get("claimed") == "changed" and members() == ["other"]


# -- locks ------------------------------------------------------------------------------------------
def test_lock_belongs_to_its_token(backend: Backend) -> None:
    s = backend.store
    assert s.acquire_lock("lock", "a", 60_000) is True
    assert s.acquire_lock("lock", "a", 60_000) is False
    assert s.acquire_lock("lock", "b", 60_000) is False
    assert s.extend_lock("lock", "b", 120_000) is False
    assert s.release_lock("lock", "b") is False
    assert s.extend_lock("lock", "a", 120_000) is True
    assert 60_000 < s.ttl_ms("lock") <= 120_000
    assert s.release_lock("lock", "a") is True
    assert s.extend_lock("lock", "a", 60_000) is False
    assert s.acquire_lock("lock", "b", 60_000) is True


# -- sorted index -------------------------------------------------------------------------------------
def test_index_ordering_and_limit(backend: Backend) -> None:
    s = backend.store
    s.index_add("idx", {"a": 1, "c": 2, "b": 2, "d": 3})
    assert s.index_range("idx") == [("d", 3.0), ("c", 2.0), ("b", 2.0), ("a", 1.0)]
    assert s.index_range("idx", newest_first=False) == [("a", 1.0), ("b", 2.0), ("c", 2.0), ("d", 3.0)]
    assert s.index_range("idx", limit=2) == [("d", 3.0), ("c", 2.0)]
    assert s.index_range("idx", limit=2, newest_first=False) == [("a", 1.0), ("b", 2.0)]
    assert s.index_range("idx", limit=0) == []
    assert s.index_range("idx", min_score=2, max_score=2) == [("c", 2.0), ("b", 2.0)]
    assert s.index_range("idx", min_score=2, newest_first=False, limit=2) == [("b", 2.0), ("c", 2.0)]
    assert s.index_range("idx", max_score=1.5) == [("a", 1.0)]
    assert s.index_range("missing") == []
    with pytest.raises(ValueError):
        s.index_range("idx", limit=-1)


def test_index_rescoring_removal_and_count(backend: Backend) -> None:
    s = backend.store
    s.index_add("idx", {"a": 1, "b": 2, "c": 1.5})
    s.index_add("idx", {"a": 10})
    assert s.index_range("idx", limit=1) == [("a", 10.0)]
    assert s.index_count("idx") == 3
    assert s.index_remove("idx", ["b", "missing"]) == 1
    assert s.index_remove("idx", []) == 0
    assert s.index_count("idx") == 2
    assert s.index_remove("idx", ["a", "c"]) == 2
    assert s.index_count("idx") == 0
    assert backend.raw_keys() == []


def test_index_add_with_no_members_creates_nothing(backend: Backend) -> None:
    backend.store.index_add("idx", {})
    assert backend.store.index_count("idx") == 0
    assert backend.raw_keys() == []


def test_index_add_each_adds_to_every_index_it_names(backend: Backend) -> None:
    s = backend.store
    s.index_add("app:{audit}:#u", {"a": 5})
    s.index_add_each({"app:{audit}:#u": {"a": 1, "b": 2}, "app:{audit}:#m": {"a": 1}, "app:{audit}:#s": {},
                      "idx-one": {"x": 3}})  # a slot of its own on a cluster
    s.index_add_each({})
    assert s.index_range("app:{audit}:#u") == [("b", 2.0), ("a", 1.0)]
    assert s.index_range("app:{audit}:#m") == [("a", 1.0)]
    assert s.index_range("idx-one") == [("x", 3.0)]
    assert sorted(backend.raw_keys()) == sorted(["app:{audit}:#u", "app:{audit}:#m", "idx-one"])


def test_scan_keys_lists_live_keys_under_a_prefix(backend: Backend) -> None:
    store = backend.store
    store.set("app:{audit}:a", "1")
    store.set("app:{audit}:b*", "2", TTL)
    store.index_add("app:{audit}:#updated", {"a": 1})
    store.set("app:{audits}:c", "3")
    store.set("app:[x]:d", "4")
    assert store.scan_keys("app:{audit}:") == ["app:{audit}:#updated", "app:{audit}:a", "app:{audit}:b*"]
    assert store.scan_keys("app:[x]:") == ["app:[x]:d"]
    backend.elapse(TTL)
    assert "app:{audit}:b*" not in store.scan_keys("app:{audit}:")


def test_index_trim_drops_the_lowest(backend: Backend) -> None:
    s = backend.store
    s.index_add("idx", {f"m{i}": float(i) for i in range(10)})
    assert s.index_trim("idx", 20) == []
    assert s.index_trim("idx", 7) == ["m0", "m1", "m2"]
    assert s.index_count("idx") == 7
    assert s.index_range("idx", newest_first=False, limit=1) == [("m3", 3.0)]
    assert s.index_trim("idx", 0) == [f"m{i}" for i in range(3, 10)]
    assert s.index_trim("missing", 1) == []
    with pytest.raises(ValueError):
        s.index_trim("idx", -1)


def test_index_scores_round_trip_exactly(backend: Backend) -> None:
    scores = {"ms": 1_732_000_000_123.0, "frac": 0.1 + 0.2, "neg": -2.5e-7}
    backend.store.index_add("idx", scores)
    assert dict(backend.store.index_range("idx")) == scores


# -- envelopes through DomainStore ----------------------------------------------------------------
class PayloadSchema(marshmallow.Schema):
    payload = fields.Raw(required=True)


class NoteSchema(marshmallow.Schema):
    body = fields.String(required=True)
    tags = fields.List(fields.String(), required=True)


PAYLOADS = Domain("payloads", EnvelopeSchema(1, PayloadSchema()))
NOTES = Domain(
    "notes",
    EnvelopeSchema(2, NoteSchema(), upgrades={1: lambda old: {"body": old["text"], "tags": []}}),
)


def domain_store(backend: Backend, domain: Domain, misses: list | None = None) -> DomainStore:
    on_miss = None if misses is None else (lambda name, reason: misses.append((name, reason)))
    return DomainStore(backend.store, KEYS, domain, clock=lambda: 1_732_000_000_123, on_miss=on_miss)


ROUND_TRIPS = {
    "unicode": "héllo — 你好, مرحبا, 👩‍👩‍👧 \u202e\u0000 \\ \" '",
    "nested": {"a": [1, 2.5, None, True, {"b": {"c": ["d", {"e": []}]}}], "ü": {"": 0}},
    "large": {"blob": "€" * 300_000, "list": list(range(10_000))},
    "scalar": -17,
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_serialization_round_trip(backend: Backend, name: str) -> None:
    ds = domain_store(backend, PAYLOADS)
    data = {"payload": ROUND_TRIPS[name]}
    ds.set("id", data)
    assert ds.get("id") == data
    entry = ds.get_entry("id")
    assert entry.updated_at == "2024-11-19T07:06:40.123Z"
    assert json.loads(entry.raw) == {"version": 1, "updatedAt": entry.updated_at, "data": data}


def test_unserializable_or_oversized_data_writes_nothing(backend: Backend) -> None:
    ds = domain_store(backend, PAYLOADS)
    with pytest.raises(TypeError):
        ds.set("id", {"payload": {1, 2}})
    with pytest.raises(ValueTooLarge):
        ds.set("id", {"payload": "x" * DEFAULT_MAX_VALUE_BYTES})
    with pytest.raises(TypeError):
        ds.mset({"ok": {"payload": 1}, "bad": {"payload": object()}})
    assert backend.raw_keys() == []


def test_reading_an_older_version_upgrades_it(backend: Backend) -> None:
    ds = domain_store(backend, NOTES)
    old = json.dumps({"version": 1, "updatedAt": "2024-01-01T00:00:00.000Z", "data": {"text": "hi"}})
    backend.store.set(ds.key("n1"), old)
    assert ds.get("n1") == {"body": "hi", "tags": []}
    assert ds.get_entry("n1").raw == old
    assert ds.update("n1", lambda data: {**data, "tags": ["upgraded"]}) == {"body": "hi", "tags": ["upgraded"]}
    assert json.loads(backend.store.get(ds.key("n1")))["version"] == 2
    assert ds.misses == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (json.dumps({"version": 3, "updatedAt": "2030-01-01T00:00:00.000Z", "data": {"x": 1}}), "unknown_version"),
        ("{not json", "corrupt"),
        (json.dumps({"version": 2, "data": {"body": "b", "tags": []}}), "corrupt"),
        (json.dumps({"version": 2, "updatedAt": "2024-01-01T00:00:00.000Z", "data": {"body": 5}}), "corrupt"),
        (json.dumps({"version": 1, "updatedAt": "2024-01-01T00:00:00.000Z", "data": {"no_text": 1}}), "corrupt"),
    ],
    ids=["newer-version", "not-json", "missing-field", "bad-data", "failing-upgrade"],
)
def test_unreadable_values_are_counted_misses(
    backend: Backend, caplog: pytest.LogCaptureFixture, raw: str, reason: str
) -> None:
    misses: list[tuple[str, str]] = []
    ds = domain_store(backend, NOTES, misses)
    ds.set("good", {"body": "fine", "tags": []})
    backend.store.set(ds.key("bad"), raw)
    with caplog.at_level(logging.WARNING, logger="relay.stores"):
        assert ds.get("bad") is None
        assert ds.mget(["good", "bad"]) == [{"body": "fine", "tags": []}, None]
    assert ds.misses == 2
    assert misses == [("notes", reason), ("notes", reason)]
    assert [getattr(r, "domain", None) for r in caplog.records] == ["notes", "notes"]


# -- key escaping ------------------------------------------------------------------------------------
TRICKY_IDS = [
    "plain", "a:b", "a%3Ab", "a:b:c", "*", "a*", "a?[b]", "{tag}", "a{b}c", "{", "}", "with space", " ",
    "名字", "émoji🙂", "", "%", "~", "#x", "line\nbreak", "x" * 5000, "x" * 4999 + "y", "é" * 2500,
]


def test_tricky_ids_neither_collide_nor_inject(backend: Backend) -> None:
    ds = domain_store(backend, PAYLOADS)
    for n, id_ in enumerate(TRICKY_IDS):
        ds.set(id_, {"payload": n})
    for n, id_ in enumerate(TRICKY_IDS):
        assert ds.get(id_) == {"payload": n}, id_
    raw = backend.raw_keys()
    assert len(raw) == len(TRICKY_IDS)
    for key in raw:
        assert key.startswith("relay:test:payloads:")
        assert re.fullmatch(r"[A-Za-z0-9._%~-]+", key[len(ds.prefix):]), key
        assert len(key) <= len(ds.prefix) + MAX_ESCAPED_ID, key
        assert not set(key) & set("{}*?[] \n"), key


def test_colocated_domain_keys_carry_one_hash_tag(backend: Backend) -> None:
    ds = domain_store(backend, Domain("pairs", PAYLOADS.schema, colocated=True))
    ds.set("{x}:*", {"payload": 1})
    ds.index_add("recent", {"{x}:*": 1.0})
    raw = backend.raw_keys()
    assert len(raw) == 2
    for key in raw:
        assert key.startswith("relay:test:{pairs}:")
        assert key.count("{") == key.count("}") == 1
    assert ds.index_range("recent") == [("{x}:*", 1.0)]


# -- concurrency: 8 threads -----------------------------------------------------------------------------
def test_set_if_absent_race_has_one_winner_per_key(backend: Backend) -> None:
    s = backend.store
    keys = [f"reserve:{i}" for i in range(40)]

    def work(thread: int) -> list[str]:
        order = keys[:]
        random.Random(thread).shuffle(order)
        return [k for k in order if s.set_if_absent(k, f"t{thread}", ttl_ms=60_000)]

    won = race(THREADS, work)
    winners = Counter(k for keys_won in won for k in keys_won)
    assert winners == Counter({k: 1 for k in keys})
    for thread, keys_won in enumerate(won):
        assert s.mget(keys_won) == [f"t{thread}"] * len(keys_won)


def test_incr_totals_are_exact(backend: Backend) -> None:
    s = backend.store
    per_thread = 150
    results = race(THREADS, lambda _: [s.incr("hits", ttl_ms=60_000) for _ in range(per_thread)])
    seen = sorted(v for values in results for v in values)
    assert seen == list(range(1, THREADS * per_thread + 1))
    assert s.incr("hits", 0) == THREADS * per_thread


def test_compare_and_set_loses_no_update(backend: Backend) -> None:
    s = backend.store
    s.set("counter", "0")
    per_thread = 20

    def work(_: int) -> int:
        for _ in range(per_thread):
            while True:
                current = s.get("counter")
                if s.compare_and_set("counter", current, str(int(current) + 1)):
                    break
        return per_thread

    race(THREADS, work)
    assert s.get("counter") == str(THREADS * per_thread)


def test_domain_update_loses_no_update(backend: Backend) -> None:
    ds = domain_store(backend, PAYLOADS)
    ds.set("c", {"payload": 0})
    race(THREADS, lambda _: [ds.update("c", lambda d: {"payload": d["payload"] + 1}, attempts=1000) for _ in range(10)])
    assert ds.get("c") == {"payload": THREADS * 10}


def test_lock_never_has_two_holders(backend: Backend) -> None:
    s = backend.store
    holders: set[str] = set()
    guard = threading.Lock()
    violations: list[str] = []
    per_thread = 5

    def work(thread: int) -> int:
        token = f"t{thread}"
        held = 0
        while held < per_thread:
            if not s.acquire_lock("lock", token, 60_000):
                time.sleep(0.0002)
                continue
            with guard:
                if holders:
                    violations.append(f"{token} acquired while {holders} held it")
                holders.add(token)
            time.sleep(0.0005)
            if s.get("lock") != token:
                violations.append(f"{token} lost the lock while holding it")
            with guard:
                holders.discard(token)
            assert s.release_lock("lock", token)
            held += 1
        return held

    assert sum(race(THREADS, work)) == THREADS * per_thread
    assert violations == []


# -- watermarks ----------------------------------------------------------------------------------
WATCHED = "app:{audit}:#updated"
MARK = watermark_key(WATCHED)


def _full_pass(s: Store, upto: float) -> None:
    s.watermark_begin(MARK, upto)
    s.watermark_end(MARK, upto)


def test_a_watermark_vouches_for_what_its_passes_worked_through(backend: Backend) -> None:
    s = backend.store
    assert s.watermark(MARK) is None
    assert s.watermark_begin(MARK, 100) is None  # the first pass works from the lowest score
    assert s.watermark(MARK) is None
    assert s.watermark_end(MARK, 100) == 100.0
    assert s.watermark(MARK) == 100.0
    assert s.watermark_begin(MARK, 200) == 100.0
    assert s.watermark_end(MARK, 200) == 200.0
    assert s.watermark(MARK) == 200.0


def test_an_add_at_or_below_the_watermark_lowers_it_and_one_above_does_not(backend: Backend) -> None:
    s = backend.store
    s.index_add_capped(WATCHED, {"early": 50.0}, 10, "app:{audit}:", MARK)
    assert s.index_range(MARK) == []  # no watermark yet: nothing to lower, nothing made
    _full_pass(s, 100)
    s.index_add_capped(WATCHED, {"after": 101.0}, 10, "app:{audit}:", MARK)
    assert s.watermark(MARK) == 100.0
    s.index_add_capped(WATCHED, {"at": 100.0}, 10, "app:{audit}:", MARK)
    assert s.watermark(MARK) == 99.5
    s.index_add_capped(WATCHED, {"below": 60.0, "also": 80.0}, 10, "app:{audit}:", MARK)
    s.index_add_capped(WATCHED, {"less-low": 70.0}, 10, "app:{audit}:", MARK)
    assert s.watermark(MARK) == 59.5
    s.watermark_lower(MARK, 40.0)
    assert s.watermark(MARK) == 39.5
    assert s.watermark_begin(MARK, 300) == 39.5  # the next pass works from below the late adds
    assert s.watermark_end(MARK, 300) == 300.0
    assert s.index_count(WATCHED) == 6


def test_an_add_during_a_pass_at_or_below_its_target_holds_the_pass_back(backend: Backend) -> None:
    s = backend.store
    _full_pass(s, 100)
    assert s.watermark_begin(MARK, 200) == 100.0
    s.index_add_capped(WATCHED, {"above-the-pass": 201.0}, 10, "app:{audit}:", MARK)
    s.index_add_capped(WATCHED, {"in-the-pass": 150.0}, 10, "app:{audit}:", MARK)
    assert s.watermark(MARK) == 100.0  # the pass has not vouched for 150 yet
    assert s.watermark_end(MARK, 200) == 149.5
    assert s.watermark_begin(MARK, 300) == 149.5


def test_a_pass_another_began_since_moves_nothing(backend: Backend) -> None:
    s = backend.store
    _full_pass(s, 100)
    assert s.watermark_begin(MARK, 200) == 100.0
    assert s.watermark_begin(MARK, 300) == 100.0
    assert s.watermark_end(MARK, 200) == 100.0
    assert s.watermark_end(MARK, 300) == 300.0


def test_late_adds_during_a_pass_outlive_another_pass_s_begin(backend: Backend) -> None:
    """Two passes to the same score: whichever ends first still stops below what was added late."""
    s = backend.store
    _full_pass(s, 100)
    s.watermark_begin(MARK, 200)
    s.watermark_lower(MARK, 150)
    assert s.watermark_begin(MARK, 200) == 100.0
    assert s.watermark_end(MARK, 200) == 149.5
    assert s.watermark_end(MARK, 200) == 149.5
    assert s.watermark_begin(MARK, 300) == 149.5
    assert s.watermark_end(MARK, 300) == 300.0
