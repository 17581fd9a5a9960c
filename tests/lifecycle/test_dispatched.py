"""``DispatchedCommands``: the records a process wrote for its dispatched commands, each taken once,
the oldest dropped beyond the limit."""
from __future__ import annotations

import pytest

from relay.lifecycle.dispatched import DispatchedCommands
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
