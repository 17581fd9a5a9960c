"""``process_times``: what the benchmarks read of a process's CPU and page faults from ``/proc``."""
from __future__ import annotations

import mmap
import os
import resource

from tests.support.live_relay import ProcessTimes, process_times

PAGES = 256


def test_touching_fresh_pages_counts_a_minor_fault_each() -> None:
    before = process_times(os.getpid())
    with mmap.mmap(-1, PAGES * mmap.PAGESIZE) as fresh:
        for page in range(PAGES):
            fresh[page * mmap.PAGESIZE] = 1
        after = process_times(os.getpid())

    assert after.since(before).minor_faults >= PAGES


def test_user_and_system_time_are_the_processs_own_as_the_kernel_reports_them() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = process_times(os.getpid())
    tick = 1 / os.sysconf("SC_CLK_TCK")

    assert abs(times.user_s - usage.ru_utime) <= 2 * tick + 0.05
    assert abs(times.system_s - usage.ru_stime) <= 2 * tick + 0.05
    assert times.cpu_s == times.user_s + times.system_s


def test_several_processes_add_up_and_differences_and_sums_go_field_by_field() -> None:
    one = process_times(os.getpid())
    twice = process_times(os.getpid(), os.getpid())

    assert twice.minor_faults >= 2 * one.minor_faults > 0
    assert twice.user_s >= 2 * one.user_s
    assert ProcessTimes(3.0, 2.0, 10).since(ProcessTimes(1.0, 0.5, 4)) == ProcessTimes(2.0, 1.5, 6)
    assert ProcessTimes(1.0, 0.5, 4).plus(ProcessTimes(2.0, 1.5, 6)) == ProcessTimes(3.0, 2.0, 10)
