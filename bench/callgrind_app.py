"""The relay as the instruction-count benchmark runs it under callgrind (``bench/instructions.py``).

It is ``wsgi:app`` plus one thing in each worker: a thread that watches the file named by
``BENCH_CALLGRIND_TRIGGER`` and calls ``os.getsid`` whenever the number in it grows. callgrind runs
with ``--dump-before=getsid``, so each call writes the instructions counted since the previous one
to a new dump file: the benchmark bumps the file before and after its load and reads the second
dump. Nothing in the relay itself knows about this.
"""
from __future__ import annotations

import os
import threading
import time

from wsgi import app

__all__ = ["app"]

POLL_S = 0.5


def _watch(path: str) -> None:
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
            os.getsid(0)


threading.Thread(target=_watch, args=(os.environ["BENCH_CALLGRIND_TRIGGER"],), name="callgrind-trigger",
                 daemon=True).start()
