"""``AuditTrail.hydrate``: what a replay of the log writes when the log holds more commands than the
index keeps."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay.domains.audit import DOMAIN, AuditIndex
from relay.lifecycle.context import AuditTrail
from relay.stores.domain import DomainStore
from relay.stores.keys import KeySpace
from tests.support.helpers import CountingWrites


def _event(number: int, status: str, second: int = 0) -> dict[str, Any]:
    return {"commandId": f"c{number:02d}", "timestamp": f"2026-11-26T10:{number:02d}:{second:02d}.000Z",
            "status": status, "userId": "u1", "machineId": "m1"}


def _trail(tmp_path: Path, events: list[dict[str, Any]], max_records: int) -> tuple[AuditTrail, CountingWrites]:
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(json.dumps(event) + "\n" for event in events))
    backend = CountingWrites()
    store = DomainStore(backend, KeySpace("relay", "test"), DOMAIN)
    return AuditTrail(AuditIndex(lambda: store, max_records=max_records), str(log)), backend


def _log(count: int) -> list[dict[str, Any]]:
    return [event for n in range(count) for event in (_event(n, "created"), _event(n, "machine_offline", 1))]


def test_only_the_commands_the_index_keeps_are_written(tmp_path: Path) -> None:
    trail, backend = _trail(tmp_path, _log(30), max_records=10)

    assert trail.hydrate() == 20

    kept = [record["commandId"] for record in trail.index.list_recent(100)]
    assert kept == [f"c{n:02d}" for n in range(29, 19, -1)]
    assert backend.writes == 10


def test_the_same_index_is_kept_as_when_every_command_is_replayed(tmp_path: Path) -> None:
    trail, _ = _trail(tmp_path, _log(30), max_records=10)
    (tmp_path / "all").mkdir()
    everything, _ = _trail(tmp_path / "all", _log(30), max_records=10)
    for events in (_log(30)[i:i + 2] for i in range(0, 60, 2)):
        everything.index.apply_all(events)

    trail.hydrate()

    assert trail.index.list_recent(100) == everything.index.list_recent(100)


def test_an_older_command_whose_record_is_still_kept_gets_its_missing_events(tmp_path: Path) -> None:
    trail, _ = _trail(tmp_path, _log(30), max_records=10)
    trail.index.apply({**_event(3, "agent_ok"), "timestamp": "2026-11-26T11:00:00.000Z"})

    trail.hydrate()

    assert [e["status"] for e in trail.index.get("c03")["events"]] == ["agent_ok", "created", "machine_offline"]
    assert trail.index.count() == 10
