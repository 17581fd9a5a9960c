"""``bench/instructions.py``: a load's instructions per callback, less the worker's idle work."""
from __future__ import annotations

from bench.instructions import less_idle


def test_the_idle_rate_over_the_load_s_duration_is_taken_off_before_dividing() -> None:
    # 1,200 M in a 20 s load of 300 callbacks; idle, 35 M in 10 s: 70 M of the load was idle work.
    assert less_idle(1_200_000_000, 300, 20.0, 35_000_000, 10.0) == 3_766_667
    assert less_idle(1_200_000_000, 300, 20.0, 0, 10.0) == 4_000_000


def test_without_callbacks_or_an_idle_window_there_is_no_figure() -> None:
    assert less_idle(1_000, 0, 1.0, 10, 1.0) is None
    assert less_idle(1_000, 10, 1.0, 10, 0.0) is None
