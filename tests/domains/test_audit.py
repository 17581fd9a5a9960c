"""``AuditIndex.apply_all``: a command's events added with one update, each at most once;
``apply_to_known_then_claim``: an answer written over the record as it was written, never over a
changed one; and filtered ``list_recent``, which decodes only the records that can match."""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from relay.domains import inflight
from relay.domains.audit import DOMAIN, AuditIndex, stored_form
from relay.domains.inflight import InflightCommands
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from tests.support.helpers import CountingWrites


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
