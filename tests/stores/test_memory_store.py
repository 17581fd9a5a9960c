"""MemoryStore behaviour beyond the contract: its clock, reclaiming and isolation."""
from __future__ import annotations

import marshmallow
import pytest
from marshmallow import fields

from relay.stores.base import StoreError
from relay.stores.domain import Domain, DomainStore
from relay.stores.envelope import EnvelopeSchema
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from tests.support.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


def test_expiry_follows_the_injected_clock_to_the_millisecond(store: MemoryStore, clock: FakeClock) -> None:
    store.set("k", "v", ttl_ms=100)
    clock.advance(99)
    assert store.get("k") == "v"
    assert store.ttl_ms("k") == 1
    clock.advance(1)
    assert store.get("k") is None
    assert store.ttl_ms("k") is None


def test_expired_keys_are_reclaimed_a_bounded_batch_per_call(store: MemoryStore, clock: FakeClock) -> None:
    batch = MemoryStore.RECLAIM_PER_CALL
    for i in range(3 * batch):
        store.set(f"k{i}", "v", ttl_ms=10)
    store.set("keep", "v")
    clock.advance(10)
    assert store.key_count() == 3 * batch + 1  # nothing is reclaimed until a call runs
    store.get("keep")
    assert store.key_count() == 2 * batch + 1
    store.get("keep")
    store.get("keep")
    assert store.key_count() == 1
    assert store._deadlines == []


def test_rewriting_a_key_with_a_ttl_does_not_grow_the_deadline_heap(store: MemoryStore) -> None:
    for i in range(10_000):
        store.set("k", str(i), ttl_ms=3_600_000)
    assert len(store._deadlines) <= 2 + MemoryStore.RECLAIM_PER_CALL
    assert store.get("k") == "9999"
    assert store.ttl_ms("k") == 3_600_000


def test_a_stale_deadline_does_not_expire_a_rewritten_key(store: MemoryStore, clock: FakeClock) -> None:
    store.set("k", "old", ttl_ms=10)
    store.set("k", "new", ttl_ms=1000)
    clock.advance(10)
    assert store.get("k") == "new"
    store.set("k", "forever")
    clock.advance(1000)
    assert store.get("k") == "forever"


def test_scan_keys_skips_expired_keys(store: MemoryStore, clock: FakeClock) -> None:
    store.set("a:1", "v", ttl_ms=10)
    store.set("a:2", "v")
    store.set("b:1", "v")
    clock.advance(10)
    assert store.scan_keys("a:") == ["a:2"]


def test_max_keys_bounds_new_keys_only(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock, max_keys=2)
    store.set("a", "1")
    store.set("b", "1")
    with pytest.raises(StoreError):
        store.set("c", "1")
    store.set("a", "2")
    assert store.get("a") == "2"


class DocSchema(marshmallow.Schema):
    doc = fields.Raw(required=True)


def test_data_read_or_written_is_never_shared_with_the_store(store: MemoryStore) -> None:
    ds = DomainStore(store, KeySpace("relay", "test"), Domain("docs", EnvelopeSchema(1, DocSchema())))
    written = {"doc": {"items": [1, 2], "meta": {"n": 1}}}
    ds.set("d", written)
    written["doc"]["items"].append(3)
    first = ds.get("d")
    first["doc"]["meta"]["n"] = 99
    first["doc"]["items"].clear()
    assert ds.get("d") == {"doc": {"items": [1, 2], "meta": {"n": 1}}}
