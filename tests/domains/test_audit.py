"""``AuditIndex.apply_all``: a command's events added with one update, each at most once;
``apply_to_known_then_claim``: an answer written over the record as it was written, never over a
changed one; filtered ``list_recent``, which decodes only the records that can match; and ``link``,
which puts records in the index of each of their filter values behind a watermark, so that a
filtered listing reads the records of one value and those written since (memory and redis-server)."""
from __future__ import annotations

import itertools
import json
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import pytest

from relay.domains import inflight
from config.phases import PRESETS
from middleware.breaker import GuardedBreaker
from middleware.routing import StoreRouter
from relay.domains.audit import DOMAIN, INDEX, LINK_LAG_MS, AuditIndex, stored_form, value_index
from relay.domains.inflight import InflightCommands
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
from relay.stores.base import Store
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.support.helpers import CountingWrites, race


def _event(status: str, second: int) -> dict[str, Any]:
    return {"commandId": "c1", "timestamp": f"2026-11-26T10:00:0{second}.000Z", "status": status,
            "userId": "u1", "machineId": "m1"}


def _index() -> tuple[AuditIndex, CountingWrites]:
    backend = CountingWrites()
    store = DomainStore(backend, KeySpace("relay", "test"), DOMAIN)
    return AuditIndex(lambda: store, max_records=100), backend


def test_a_command_s_events_are_added_in_order_with_one_write() -> None:
    index, backend = _index()
    events = [_event("created", 0), _event("sent_to_agent", 1), _event("agent_ok", 2)]

    assert index.apply_all(events) == 3

    record = index.get("c1")
    assert [e["status"] for e in record["events"]] == ["created", "sent_to_agent", "agent_ok"]
    assert record["status"] == "agent_ok" and index.count() == 1
    assert backend.writes == 1


def test_events_already_recorded_are_not_added_again() -> None:
    index, backend = _index()
    index.apply(_event("created", 0))
    writes = backend.writes

    assert index.apply_all([_event("created", 0), _event("sent_to_agent", 1)]) == 1
    assert index.apply_all([_event("created", 0), _event("sent_to_agent", 1)]) == 0

    assert [e["status"] for e in index.get("c1")["events"]] == ["created", "sent_to_agent"]
    assert backend.writes == writes + 1


def _answered_setup() -> tuple[AuditIndex, InflightCommands, Any, Any]:
    """A command opened and put in flight on one memory backend: the index, the in-flight records and
    both records as written."""
    backend = CountingWrites()
    keys = KeySpace("relay", "test")
    records = DomainStore(backend, keys, DOMAIN)
    commands_store = DomainStore(backend, keys, inflight.DOMAIN)
    index = AuditIndex(lambda: records, max_records=100)
    commands = InflightCommands(lambda: commands_store, ttl_ms=60_000)
    opened = index.open([_event("created", 0), _event("sent_to_agent", 1)], flush=True)
    tracked = commands.put({"commandId": "c1", "userId": "u1", "machineId": "m1", "kind": "status",
                            "createdAtMs": 1})
    return index, commands, opened, tracked


def test_an_answer_over_the_known_record_is_recorded_and_claims_without_a_read() -> None:
    index, commands, opened, tracked = _answered_setup()
    assert opened.data == index.get("c1") and tracked.data == commands.get("c1")

    assert index.apply_to_known_then_claim(_event("agent_ok", 2), opened, commands.answered("c1", tracked)) is True
    assert [e["status"] for e in index.get("c1")["events"]] == ["created", "sent_to_agent", "agent_ok"]
    assert commands.get("c1") is None and commands.count() == 0


def test_an_answer_over_a_record_changed_since_writes_and_claims_nothing() -> None:
    index, commands, opened, tracked = _answered_setup()
    index.apply(_event("cancel_sent", 2))

    assert index.apply_to_known_then_claim(_event("agent_ok", 3), opened, commands.answered("c1", tracked)) is None
    assert [e["status"] for e in index.get("c1")["events"]] == ["created", "sent_to_agent", "cancel_sent"]
    assert commands.get("c1") == tracked.data and commands.count() == 1


@pytest.mark.parametrize("value, form", [
    ("u1", '"u1"'),
    ("agent_error", '"agent_error"'),
    ("dev box #2 (lab)", '"dev box #2 (lab)"'),
    ("张三", None),
    ('say "hi"', None),
    ("back\\slash", None),
    ("a/b", None),
    ("tab\there", None),
])
def test_a_value_is_looked_for_only_where_every_encoder_writes_it_alike(value: str, form: Optional[str]) -> None:
    assert stored_form(value) == form


class CountingDecodes(DomainStore):
    """Counts the stored texts it decodes."""

    decoded = 0

    def decode(self, key: str, raw: Optional[str]) -> Any:
        self.decoded += raw is not None
        return super().decode(key, raw)


def _filled(records: int) -> tuple[AuditIndex, CountingDecodes]:
    """``records`` commands of users u0 to u9 on machines m0 and m1; c7's record as another JSON
    encoder wrote it (spaces, non-ASCII escaped)."""
    store = CountingDecodes(MemoryStore(), KeySpace("relay", "test"), DOMAIN)
    index = AuditIndex(lambda: store, max_records=1000)
    for n in range(records):
        index.apply({"commandId": f"c{n}", "timestamp": f"2026-11-26T10:{n // 60:02d}:{n % 60:02d}.000Z",
                     "status": "agent_error" if n % 50 == 7 else "agent_ok", "userId": f"u{n % 10}",
                     "machineId": f"m{n % 2}", "summary": "完成"})
    written = json.loads(store.store.get(store.key("c7")))
    store.store.set(store.key("c7"), json.dumps(written, indent=1, ensure_ascii=True))
    return index, store


def test_a_filtered_listing_decodes_only_the_records_that_can_match() -> None:
    index, store = _filled(200)
    store.decoded = 0
    found = index.list_recent(50, user_id="u7", machine_id="m1")
    assert [r["commandId"] for r in found] == [f"c{n}" for n in range(197, -1, -10)]
    assert store.decoded == 20

    store.decoded = 0
    assert [r["commandId"] for r in index.list_recent(50, status="agent_error")] == ["c157", "c107", "c57", "c7"]
    assert store.decoded == 4


def test_a_filter_by_a_value_no_encoder_writes_alike_decodes_every_record() -> None:
    index, store = _filled(30)
    store.decoded = 0
    assert index.list_recent(50, user_id="张三") == []
    assert store.decoded == 30


START_MS = 1_795_000_000_000


def _at(second: int) -> str:
    """The ISO time ``second`` seconds after ``START_MS``."""
    from relay.stores.envelope import iso_ms
    return iso_ms(START_MS + 1000 * second)


class CountingReads(DomainStore):
    """Counts the records read by ``mget_raw`` (a listing's reads)."""

    read = 0

    def mget_raw(self, ids: Any) -> Any:
        self.read += len(ids)
        return super().mget_raw(ids)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    store = RedisStore(request.getfixturevalue("redis_server").url, breaker=GuardedBreaker())
    yield store
    store.close()


def _audit(backend: Store, max_records: int = 1000) -> tuple[AuditIndex, CountingReads]:
    store = CountingReads(backend, KeySpace("relay", "links"), DOMAIN)
    return AuditIndex(lambda: store, max_records=max_records), store


def _command(index: AuditIndex, n: int, second: int, status: str = "agent_ok") -> None:
    index.apply({"commandId": f"c{n}", "timestamp": _at(second), "status": status, "userId": f"u{n % 10}",
                 "machineId": f"m{n % 2}"})


def _link(index: AuditIndex, second: int, **kwargs: Any) -> int:
    """``link`` as the leader runs it ``second`` seconds after ``START_MS``, plus the lag it keeps:
    the records written up to ``second`` get linked."""
    return index.link(START_MS + 1000 * second + LINK_LAG_MS, **kwargs)


def _everything(index: AuditIndex, **wanted: str) -> list[str]:
    """The answer as a read of every record gives it."""
    names = {"user_id": "userId", "machine_id": "machineId", "status": "status"}
    return [r["commandId"] for r in index.list_recent(100_000)
            if all(r.get(names[k]) == v for k, v in wanted.items())]


def _ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["commandId"] for r in records]


def test_without_a_watermark_a_filtered_listing_reads_every_record(backend: Store) -> None:
    index, store = _audit(backend)
    for n in range(40):
        _command(index, n, n)
    store.read = 0
    assert _ids(index.list_recent(50, user_id="u7")) == ["c37", "c27", "c17", "c7"]
    assert store.read == 40


def test_after_link_a_filtered_listing_reads_the_value_index_and_what_came_since(backend: Store) -> None:
    index, store = _audit(backend)
    for n in range(200):
        _command(index, n, n)
    assert _link(index, 199) == 200
    for n in range(200, 210):
        _command(index, n, n)  # after the watermark: not linked yet
    store.read = 0
    found = _ids(index.list_recent(50, user_id="u7"))
    assert store.read == 10 + 20  # the ten records since the watermark, and u7's twenty below it
    assert found == _everything(index, user_id="u7") == [f"c{n}" for n in range(207, -1, -10)]

    store.read = 0
    assert _ids(index.list_recent(3, machine_id="m1", user_id="u3")) == ["c203", "c193", "c183"]
    assert store.read == 10 + 20  # u3's index, read a page at a time


def test_a_linked_record_leaves_the_index_of_the_status_it_had(backend: Store) -> None:
    index, store = _audit(backend)
    _command(index, 1, 0, status="sent_to_agent")
    _command(index, 2, 1, status="sent_to_agent")
    _link(index, 1)
    _command(index, 1, 2, status="agent_ok")
    _link(index, 2)
    store.read = 0
    assert _ids(index.list_recent(50, status="sent_to_agent")) == ["c2"]
    assert store.read == 1
    assert _ids(index.list_recent(50, status="agent_ok")) == ["c1"]


def test_link_takes_every_record_of_a_score_shared_beyond_a_page(backend: Store) -> None:
    index, store = _audit(backend)
    for n in range(12):
        _command(index, n, 0 if n < 7 else n)  # seven records at the same millisecond
    assert _link(index, 11, page_size=3) == 12
    for user in ("u0", "u3", "u6", "u9"):
        store.read = 0
        found = _ids(index.list_recent(50, user_id=user))
        assert store.read == len(found)
        assert found == _everything(index, user_id=user)


def test_a_value_index_keeps_no_more_entries_than_the_records_kept(backend: Store) -> None:
    """Records trimmed past the cap leave their value indexes when those are next linked into."""
    index, store = _audit(backend, max_records=5)
    for n in range(0, 100, 10):  # all u0
        _command(index, n, n)
        _link(index, n)
    assert index.count() == 5
    assert store.index_count(value_index("userId", "u0")) == 5
    assert _ids(index.list_recent(50, user_id="u0")) == ["c90", "c80", "c70", "c60", "c50"]


def test_listings_through_the_links_equal_a_read_of_everything(backend: Store) -> None:
    """Commands added, answered (their status changes) and trimmed past the cap in a random order,
    with ``link`` now and then: every filtered listing equals the answer a read of everything gives."""
    rng = random.Random(7)
    index, _ = _audit(backend, max_records=30)
    second, count = 0, 0
    for step in range(300):
        second += 1
        # One write in five comes from a clock 1 to 30 s behind: often below the watermark.
        at = second - (rng.randrange(1, 30) if rng.random() < 0.2 else 0)
        if count and rng.random() < 0.4:
            _command(index, rng.randrange(max(0, count - 40), count), at,
                     status=rng.choice(["agent_ok", "agent_error", "cancel_sent"]))
        else:
            _command(index, count, at, status=rng.choice(["created", "sent_to_agent"]))
            count += 1
        if rng.random() < 0.2:
            _link(index, second)
        if step % 25 == 24:
            for wanted in ({"user_id": "u3"}, {"machine_id": "m0"}, {"status": "sent_to_agent"},
                           {"status": "agent_ok", "user_id": "u4"}):
                assert _ids(index.list_recent(8, **wanted)) == _everything(index, **wanted)[:8], (step, wanted)


def test_a_record_written_below_the_watermark_is_found_before_and_after_the_next_link(backend: Store) -> None:
    """A writer whose clock is a minute behind the leader's: its record lands below the watermark."""
    index, store = _audit(backend)
    for n in range(100, 110):
        _command(index, n, n)
    _link(index, 109)
    _command(index, 3, 50)  # u3, at a time the watermark passed long ago
    assert store.watermark(INDEX) == START_MS + 1000 * 50 - 0.5
    assert _ids(index.list_recent(50, user_id="u3")) == ["c103", "c3"]
    _link(index, 110)
    assert store.watermark(INDEX) == START_MS + 1000 * 110
    store.read = 0
    assert _ids(index.list_recent(50, user_id="u3")) == ["c103", "c3"]
    assert store.read == 2  # through u3's index alone


class WritesDuringAPass(CountingReads):
    """Runs ``during`` once, right after ``link`` read its first page of ``#updated``."""

    during: Optional[Any] = None

    def index_range(self, index: str, *args: Any, **kwargs: Any) -> Any:
        page = super().index_range(index, *args, **kwargs)
        if index == INDEX and kwargs.get("newest_first") is False and self.during is not None:
            during, self.during = self.during, None
            during()
        return page


def test_a_record_written_in_a_pass_s_range_after_its_read_is_left_to_the_next_pass(backend: Store) -> None:
    store = WritesDuringAPass(backend, KeySpace("relay", "links"), DOMAIN)
    index = AuditIndex(lambda: store, max_records=1000)
    for n in range(10, 20):
        _command(index, n, n)
    store.during = lambda: _command(index, 4, 15)  # within the pass's range, after its read of it
    _link(index, 30)
    assert store.watermark(INDEX) == START_MS + 1000 * 15 - 0.5
    assert _ids(index.list_recent(50, user_id="u4")) == ["c4", "c14"]
    _link(index, 31)
    store.read = 0
    assert _ids(index.list_recent(50, user_id="u4")) == ["c4", "c14"]
    assert store.read == 2


def _race(index: AuditIndex, scope: Callable[[], ContextManager[Any]]) -> None:
    """Four writers, three writes in ten from a clock up to a minute behind, and a fifth thread linking
    up to the shared clock until they are done, each call in a ``scope`` of its own; then a last pass."""
    seconds = itertools.count(1)  # the shared clock; ``next`` on it is atomic
    finished = [threading.Event() for _ in range(4)]

    def work(thread: int) -> None:
        if thread == len(finished):
            while not all(event.is_set() for event in finished):
                with scope():
                    _link(index, next(seconds))
            return
        rng = random.Random(thread)
        mine: list[int] = []
        try:
            for i in range(120):
                at = next(seconds) - (rng.randrange(1, 60) if rng.random() < 0.3 else 0)
                with scope():
                    if mine and rng.random() < 0.3:
                        _command(index, rng.choice(mine), at, status=rng.choice(["agent_ok", "agent_error"]))
                    else:
                        mine.append(1000 * thread + i)
                        _command(index, mine[-1], at, status="sent_to_agent")
        finally:
            finished[thread].set()

    race(len(finished) + 1, work)
    with scope():
        _link(index, next(seconds) + 60)


def _listings_equal_a_read_of_everything(index: AuditIndex) -> None:
    for wanted in ({"user_id": "u0"}, {"user_id": "u3"}, {"user_id": "u7"}, {"status": "sent_to_agent"},
                   {"status": "agent_ok"}):
        found = _ids(index.list_recent(1000, **wanted))
        assert found and found == _everything(index, **wanted), wanted


def test_writers_racing_linking_passes_leave_no_record_unlinked(backend: Store) -> None:
    """After the race and a last pass, every filtered listing equals a read of everything, and a
    listing by user reads nothing but that user's index."""
    index, store = _audit(backend, max_records=10_000)
    _race(index, nullcontext)
    for user in ("u0", "u3", "u7"):
        store.read = 0
        found = _ids(index.list_recent(1000, user_id=user))
        assert store.read == len(found)
    _listings_equal_a_read_of_everything(index)


def test_writers_racing_linking_passes_through_units_of_work_leave_no_record_unlinked(
        redis_server: Any) -> None:
    """The same race as the relay runs it on Redis: each call in a unit of work of its own, whose
    round trips carry an audit write's index entry after the record."""
    redis_store = RedisStore(redis_server.url, breaker=GuardedBreaker())
    router = StoreRouter(KeySpace("relay", "race"), {"audit": DOMAIN}, {"memory": MemoryStore(), "redis": redis_store},
                         {"audit": PRESETS["redis-primary"]})
    try:
        index = AuditIndex(router.provider("audit"), max_records=10_000)
        _race(index, router.bound)
        with router.bound():
            _listings_equal_a_read_of_everything(index)
    finally:
        router.close()
