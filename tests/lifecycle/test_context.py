"""``AuditTrail``'s JSONL file: one open descriptor, reopened after a log rotation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from relay.lifecycle.context import AuditTrail


class NewEvents:
    """Stands in for the audit index: every event is new, so ``record`` appends it."""

    def apply(self, event: dict[str, Any]) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def event(n: int) -> dict[str, Any]:
    return {"commandId": f"c{n}", "timestamp": f"2026-11-25T00:00:{n:02d}.000Z", "status": "queued"}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def trail(tmp_path: Path, clock: Clock) -> AuditTrail:
    return AuditTrail(NewEvents(), str(tmp_path / "audit" / "events.jsonl"), clock=clock)  # type: ignore[arg-type]


def test_events_are_appended_through_one_open_descriptor(trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    trail.record(event(0))  # creates the directory and opens the file
    opened: list[Any] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))

    for n in range(1, 3):
        trail.record(event(n))
    trail.log([event(3), event(4)])

    assert [e["commandId"] for e in trail.events_from_disk()] == ["c0", "c1", "c2", "c3", "c4"]
    assert opened == []


def test_a_rotated_file_is_replaced_by_a_new_one_within_the_check_interval(trail: AuditTrail, clock: Clock) -> None:
    assert trail.path is not None
    trail.record(event(1))
    rotated = trail.path.with_name("events.jsonl.1")
    trail.path.rename(rotated)

    trail.record(event(2))  # within the interval: still the open (rotated) file
    clock.now += AuditTrail.REOPEN_CHECK_S
    trail.record(event(3))

    assert [e["commandId"] for e in trail.events_from_disk()] == ["c3"]
    assert rotated.read_text().count("\n") == 2


def test_a_removed_file_is_created_again(trail: AuditTrail, clock: Clock) -> None:
    assert trail.path is not None
    trail.record(event(1))
    trail.path.unlink()
    clock.now += AuditTrail.REOPEN_CHECK_S
    trail.record(event(2))

    assert [e["commandId"] for e in trail.events_from_disk()] == ["c2"]


def test_a_failed_write_is_counted_and_the_next_one_opens_the_file_again(
    trail: AuditTrail, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail.record(event(1))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space left")))
    trail.record(event(2))
    monkeypatch.setattr(os, "write", real_write)
    trail.record(event(3))

    assert trail.file_errors == 1
    assert [e["commandId"] for e in trail.events_from_disk()] == ["c1", "c3"]
