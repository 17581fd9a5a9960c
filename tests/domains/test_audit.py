"""``AuditIndex.apply_all``: a command's events added with one update, each at most once."""
from __future__ import annotations

from typing import Any

from relay.domains.audit import DOMAIN, AuditIndex
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
