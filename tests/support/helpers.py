"""Small test helpers: a settable clock, a thread race runner and a memory store that counts writes."""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from relay.stores.memory import MemoryStore

T = TypeVar("T")


class FakeClock:
    """A millisecond clock that moves only when told to."""

    def __init__(self, start_ms: float = 1_000_000.0) -> None:
        self.now_ms = start_ms

    def __call__(self) -> float:
        return self.now_ms

    def advance(self, ms: float) -> None:
        self.now_ms += ms


def race(threads: int, work: Callable[[int], T], timeout_s: float = 30.0) -> list[T]:
    """Run ``work(thread_index)`` on ``threads`` threads released together; return the results.

    An exception in any thread is re-raised here.
    """
    barrier = threading.Barrier(threads)

    def start(index: int) -> T:
        barrier.wait(timeout=timeout_s)
        return work(index)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(start, i) for i in range(threads)]
        return [f.result(timeout=timeout_s) for f in futures]


class CountingWrites(MemoryStore):
    """Memory that counts compare-and-set writes (how an audit record is written)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def compare_and_set(self, *args: Any, **kwargs: Any) -> bool:
        self.writes += 1
        return super().compare_and_set(*args, **kwargs)
