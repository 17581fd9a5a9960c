"""``InflightCommands.claim`` and ``answered``: who owns a result, and what a failed claim leaves."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import pytest

from relay.domains.inflight import DOMAIN, InflightCommands
from relay.stores.base import StoreUnavailable
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore

RECORD = {"commandId": "c1", "userId": "u1", "machineId": "m1", "kind": "status", "createdAtMs": 1_000}


class FailingClaims(MemoryStore):
    """Memory whose compare-and-delete fails as an unreachable Redis does."""

    def compare_and_delete(self, key: str, expected: str) -> bool:
        raise StoreUnavailable("redis unavailable")


def _inflight(backend: MemoryStore) -> InflightCommands:
    store = DomainStore(backend, KeySpace("relay", "test"), DOMAIN)
    commands = InflightCommands(lambda: store, ttl_ms=60_000)
    commands.put(dict(RECORD))
    return commands


Claim = Callable[[InflightCommands], Callable[[str], Optional[dict[str, Any]]]]


def _claim_answered(commands: InflightCommands) -> Callable[[str], Optional[dict[str, Any]]]:
    """``answered`` claimed on its own (``Claimable.take``), as when the audit write had nothing to add."""
    def claim(command_id: str) -> Optional[dict[str, Any]]:
        claimable = commands.answered(command_id)
        return claimable.entry.data if claimable is not None and claimable.take() else None

    return claim


CLAIMS: dict[str, Claim] = {"claim": lambda c: c.claim, "answered": _claim_answered}


@pytest.mark.parametrize("claim", CLAIMS.values(), ids=CLAIMS.keys())
def test_a_claim_takes_the_record_and_its_index_entry_once(claim: Claim) -> None:
    commands = _inflight(MemoryStore())
    assert claim(commands)("c1") == RECORD
    assert commands.get("c1") is None
    assert commands.list() == [] and commands.count() == 0
    assert claim(commands)("c1") is None


def test_a_claim_that_fails_leaves_the_command_for_the_timeout_sweep() -> None:
    commands = _inflight(FailingClaims())
    with pytest.raises(StoreUnavailable):
        commands.claim("c1")
    assert commands.list(older_than_ms=2_000) == [RECORD]


def test_a_claim_of_an_answered_command_that_fails_leaves_the_record_to_its_ttl() -> None:
    commands = _inflight(FailingClaims())
    claimable = commands.answered("c1")
    assert claimable is not None
    with pytest.raises(StoreUnavailable):
        claimable.take()
    assert commands.list() == [] and commands.count() == 0
    assert commands.get("c1") == RECORD
    assert commands._store().ttl_ms("c1") is not None
