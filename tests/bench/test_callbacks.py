"""bench/callbacks.py: the order in which the modes take turns."""
from __future__ import annotations

from bench import callbacks


def test_each_mode_starts_a_round_in_turn_and_every_round_holds_every_mode() -> None:
    rounds = [callbacks._turns(number) for number in range(len(callbacks.MODES))]
    assert [order[0] for order in rounds] == list(callbacks.MODES)
    assert all(sorted(order) == sorted(callbacks.MODES) for order in rounds)
    assert callbacks._turns(len(callbacks.MODES)) == rounds[0]
