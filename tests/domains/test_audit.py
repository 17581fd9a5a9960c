"""``AuditIndex.apply_all``: a command's events added with one update, each at most once; and
``apply_to_known_then_claim``: an answer written over the record as it was written, never over a
changed one."""
from __future__ import annotations

from typing import Any

from relay.domains import inflight
from relay.domains.audit import DOMAIN, AuditIndex
from relay.domains.inflight import InflightCommands
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
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
