"""``DispatchedCommands``: the records a process wrote for its dispatched commands, each taken once,
the oldest dropped beyond the limit; and ``KeptFromSender``, which keeps those a command's sender
attached on the process holding its agent."""
from __future__ import annotations

import pytest

from relay.domains import audit, inflight
from relay.lifecycle.dispatched import DispatchedCommands, KeptFromSender, attachment
from relay.stores.envelope import Entry


def _entry(name: str) -> Entry:
    return Entry(data={"commandId": name}, updated_at="2026-11-27T00:00:00.000Z", raw=name)


def test_an_entry_is_taken_once() -> None:
    dispatched = DispatchedCommands()
    dispatched.remember("c1", _entry("audit"), _entry("inflight"))
    taken = dispatched.take("c1")
    assert taken is not None and taken.audit.raw == "audit" and taken.inflight.raw == "inflight"
    assert dispatched.take("c1") is None


def test_beyond_the_limit_the_oldest_go_first() -> None:
    dispatched = DispatchedCommands(limit=2)
    for name in ("c1", "c2", "c3"):
        dispatched.remember(name, _entry(name), _entry(name))
    assert len(dispatched) == 2
    assert dispatched.take("c1") is None
    assert dispatched.take("c2") is not None and dispatched.take("c3") is not None


def test_a_forgotten_entry_is_gone_and_the_limit_must_be_positive() -> None:
    dispatched = DispatchedCommands()
    dispatched.remember("c1", _entry("a"), _entry("i"))
    dispatched.forget("c1")
    dispatched.forget("never-there")
    assert dispatched.take("c1") is None
    with pytest.raises(ValueError):
        DispatchedCommands(limit=0)


def _written(command_id: str) -> tuple[Entry, Entry]:
    """Both records of a dispatched command as its sender's stores encoded them."""
    record = {"commandId": command_id, "userId": "u1", "machineId": "m1", "kind": "status",
              "createdAt": "2026-11-27T00:00:00.000Z", "updatedAt": "2026-11-27T00:00:00.000Z",
              "status": "sent_to_agent", "summary": "", "events": []}
    tracked = {"commandId": command_id, "userId": "u1", "machineId": "m1", "kind": "status",
               "createdAtMs": 1_790_000_000_000}
    entries = []
    for schema, data in ((audit.DOMAIN.schema, record), (inflight.DOMAIN.schema, tracked)):
        raw = schema.encode(data, 1_790_000_000_000)
        entries.append(Entry(data=data, updated_at="2026-11-27T00:00:00.000Z", raw=raw))
    return entries[0], entries[1]


def test_the_holder_keeps_what_the_sender_attached_before_the_send() -> None:
    audit_entry, inflight_entry = _written("c1")
    dispatched = DispatchedCommands()
    listener = KeptFromSender(dispatched)
    listener.before_send("m1", {"type": "command"}, attachment("c1", audit_entry, inflight_entry))
    kept = dispatched.take("c1")
    assert kept is not None
    assert (kept.audit.raw, kept.inflight.raw) == (audit_entry.raw, inflight_entry.raw)
    assert kept.audit.data["status"] == "sent_to_agent" and kept.inflight.data["userId"] == "u1"


def test_the_holder_forgets_what_it_could_not_send() -> None:
    dispatched = DispatchedCommands()
    listener = KeptFromSender(dispatched)
    attached = attachment("c1", *_written("c1"))
    listener.before_send("m1", {"type": "command"}, attached)
    listener.send_failed("m1", {"type": "command"}, attached)
    assert len(dispatched) == 0


@pytest.mark.parametrize("attached", [
    None,
    "c1",
    {"commandId": "c1"},
    {"commandId": "c1", "audit": "not an envelope", "inflight": "{}"},
    {"commandId": 7, "audit": "{}", "inflight": "{}"},
])
def test_anything_else_attached_keeps_nothing(attached: object) -> None:
    dispatched = DispatchedCommands()
    KeptFromSender(dispatched).before_send("m1", {"type": "relay.trace"}, attached)
    KeptFromSender(dispatched).send_failed("m1", {"type": "relay.trace"}, attached)
    assert len(dispatched) == 0
