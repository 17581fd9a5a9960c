"""The relay as the instruction-count benchmark runs it under callgrind (``bench/instructions.py``).

It is ``wsgi:app`` plus one thing in each worker: a thread that watches the file named by
``BENCH_CALLGRIND_TRIGGER`` and calls ``os.getsid`` whenever the number in it grows. callgrind runs
with ``--dump-before=getsid``, so each call writes the instructions counted since the previous one
to a new dump file: the benchmark bumps the file before and after its load and reads that dump.
When ``BENCH_CALLGRIND_START_LIB`` names the library built from ``callgrind_start.c``, the relay
was started with instrumentation off (starting up under callgrind takes most of a minute), and the
first bump turns it on. Nothing in the relay itself knows about this.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Optional

from wsgi import app

__all__ = ["app"]

POLL_S = 0.5


def _watch(path: str, start_instrumentation: Optional[Callable[[], None]]) -> None:
    seen = 0
    while True:
        time.sleep(POLL_S)
        try:
            with open(path) as handle:
                wanted = int(handle.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if wanted > seen:
            seen = wanted
            if start_instrumentation is not None:
                start_instrumentation()
                start_instrumentation = None
            os.getsid(0)


_start_lib = os.environ.get("BENCH_CALLGRIND_START_LIB")
_start = ctypes.CDLL(_start_lib).bench_start_instrumentation if _start_lib else None
threading.Thread(target=_watch, args=(os.environ["BENCH_CALLGRIND_TRIGGER"], _start), name="callgrind-trigger",
                 daemon=True).start()
