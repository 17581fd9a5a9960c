"""``Sweeper.start``: within each period, the leader links the audit records every
``LINK_INTERVAL_S`` or sooner, and the period itself keeps its length."""
from __future__ import annotations

from typing import Any

import pytest

from tests.lifecycle.conftest import RelayHarness


class CountedWakes:
    """Stands in for the sweeper's stop event: wakes ``count`` times at once, noting each wait."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return len(self.waits) > self.count

    def set(self) -> None:
        self.count = 0


@pytest.mark.parametrize("mode", ["memory"], indirect=True)
@pytest.mark.parametrize("interval_ms, wakes_per_period", [(7000, 2), (60000, 12), (5000, 1), (100, 1)])
def test_a_period_is_split_into_equal_wakes_that_link_and_the_last_sweeps(
        make_relay: Any, monkeypatch: pytest.MonkeyPatch, interval_ms: int, wakes_per_period: int) -> None:
    relay: RelayHarness = make_relay(SWEEP_INTERVAL_MS=str(interval_ms))
    sweeper = relay.relay.sweeper
    done: list[str] = []
    monkeypatch.setattr(sweeper, "run_once", lambda: done.append("sweep"))
    monkeypatch.setattr(sweeper, "link_audit", lambda: done.append("link"))
    wakes = CountedWakes(2 * wakes_per_period)
    monkeypatch.setattr(sweeper, "_stop", wakes)
    sweeper.start()
    sweeper._thread.join(timeout=5)  # type: ignore[union-attr]
    assert done == (["link"] * (wakes_per_period - 1) + ["sweep"]) * 2
    assert set(wakes.waits) == {interval_ms / 1000 / wakes_per_period}
