"""``python -m bench``: the machine-speed line that joins the instruction counts to the CPU times."""
from __future__ import annotations

from bench.__main__ import machine_speed


def test_machine_speed_is_instructions_per_relay_cpu_second_for_each_mode_measured_both_ways() -> None:
    sections = {
        "instructions": {"modes": {"memory": {"instructions_per_callback": 3_300_000},
                                   "redis": {"instructions_per_callback": 5_000_000}}},
        "callbacks": {"modes": {"memory": {"relay_cpu_per_callback_ms": 1.65},
                                "redis": {"relay_cpu_per_callback_ms": 2.5},
                                "outage": {"relay_cpu_per_callback_ms": 2.0}}},
    }
    assert machine_speed(sections) == {"memory": 2.0, "redis": 2.0}


def test_without_both_sections_there_is_no_machine_speed() -> None:
    assert machine_speed({"callbacks": {"modes": {"memory": {"relay_cpu_per_callback_ms": 1.0}}}}) is None
    assert machine_speed({"instructions": {"skipped": "valgrind is not installed"}}) is None
