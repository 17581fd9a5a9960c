"""bench/callbacks.py: the order in which the modes take turns."""
from __future__ import annotations

from bench import callbacks
from tests.support.live_relay import ProcessTimes


def test_each_mode_starts_a_round_in_turn_and_every_round_holds_every_mode() -> None:
    rounds = [callbacks._turns(number) for number in range(len(callbacks.MODES))]
    assert [order[0] for order in rounds] == list(callbacks.MODES)
    assert all(sorted(order) == sorted(callbacks.MODES) for order in rounds)
    assert callbacks._turns(len(callbacks.MODES)) == rounds[0]


def test_the_kernel_share_is_system_cpu_and_minor_faults_per_callback() -> None:
    times = ProcessTimes(user_s=1.5, system_s=0.25, minor_faults=500)

    assert callbacks.kernel_share(times, 1000) == {"relay_system_per_callback_ms": 0.25,
                                                   "minor_faults_per_callback": 0.5}
    assert callbacks.kernel_share(times, 0) == {"relay_system_per_callback_ms": None,
                                                "minor_faults_per_callback": None}
