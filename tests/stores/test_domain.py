"""``DomainStore``: a write's follow-up (``then``, the audit record's index entry) comes after the
write, so whoever finds the follow-up finds the record; in a unit of work it rides in the write's own
round trip."""
from __future__ import annotations

from typing import Any

from config.phases import PRESETS
from middleware import unit_of_work
from middleware.breaker import GuardedBreaker
from middleware.routing import StoreRouter
from relay.domains import audit
from relay.stores.base import Op
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.support.redisproc import RedisServer

KEYS = KeySpace("t", "dev")


def _record(status: str) -> dict[str, Any]:
    event = {"commandId": "c1", "timestamp": "2026-11-27T10:00:00.000Z", "status": status}
    record = audit.apply_event(None, event, 10)
    assert record is not None
    return record


class Recording(MemoryStore):
    """Lists the writes it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def compare_and_set(self, *args: Any, **kwargs: Any) -> bool:
        self.calls.append("compare_and_set")
        return super().compare_and_set(*args, **kwargs)

    def index_add_capped(self, *args: Any, **kwargs: Any) -> list[str]:
        self.calls.append("index_add_capped")
        return super().index_add_capped(*args, **kwargs)


def _entry_of(store: DomainStore) -> Any:
    def then(data: dict[str, Any]) -> Op:
        return store.index_add_capped_op("updated", {data["commandId"]: 1.0}, 10)

    return then


def test_a_follow_up_comes_after_the_write_and_only_when_it_wrote() -> None:
    backend = Recording()
    store = DomainStore(backend, KEYS, audit.DOMAIN)
    assert store.update_then_claim("c1", lambda _: _record("created"), None, then=_entry_of(store))[0]
    assert backend.calls == ["compare_and_set", "index_add_capped"]
    first = store.get_entry("c1")
    assert first is not None
    assert store.write_then_claim("c1", first, _record("sent_to_agent"), None, then=_entry_of(store)) == (True, False)
    backend.calls.clear()
    assert store.write_then_claim("c1", first, _record("agent_ok"), None, then=_entry_of(store)) == (False, False)
    assert backend.calls == ["compare_and_set"]


class RecordingPipelines(RedisStore):
    """Lists the calls of each round trip (``execute``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_trips: list[list[str]] = []

    def execute(self, ops: Any) -> list[Any]:
        self.round_trips.append([op.name for op in ops])
        return super().execute(ops)


def test_in_a_unit_of_work_the_follow_up_rides_right_after_the_write(redis_server: RedisServer) -> None:
    redis_store = RecordingPipelines(redis_server.url, breaker=GuardedBreaker())
    router = StoreRouter(KEYS, {"audit": audit.DOMAIN}, {"memory": MemoryStore(), "redis": redis_store},
                         {"audit": PRESETS["redis-primary"]})
    try:
        with router.bound():
            store = router.store("audit")
            assert store.update_then_claim("c1", lambda _: _record("created"), None, then=_entry_of(store))[0]
            first = store.get_entry("c1")
            assert first is not None
            store.defer(Op("set", (store.key("other"), store.encode(_record("created")), None)))
            assert store.write_then_claim("c1", first, _record("sent_to_agent"), None, then=_entry_of(store))[0]
            unit = unit_of_work.current()
            assert unit is not None and unit.pending == 0
        assert redis_store.round_trips == [["get"], ["compare_and_set", "index_add_capped"], ["get"],
                                           ["set", "compare_and_set", "index_add_capped"]]
        assert redis_store.index_range(KEYS.index_key("audit", "updated", colocated=True)) == [("c1", 1.0)]
    finally:
        router.close()
