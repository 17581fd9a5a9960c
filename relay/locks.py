"""Locks that stay OS-thread locks under gevent's monkey-patching.

gunicorn's gevent worker patches ``threading``, so ``threading.Lock()`` makes gevent's lock, whose
``acquire`` is a Python-level call. For a lock that guards only computation (no I/O, no waiting
and no call that might switch greenlets while it is held) the OS lock does the same job: greenlets
switch only where one waits, so they never find such a lock taken, while real threads (gunicorn's
gthread worker, the tests) do and are serialised by it. A lock held across anything that may yield
(a socket send, a ``sleep``, another gevent lock) must stay gevent's: a greenlet waiting for an OS
lock would block every other greenlet, the holder included.

The other helpers pick what works best under either worker: ``bounded_semaphore`` (gevent's compiled
one under gevent) and ``spawn_thread`` (a greenlet under gevent, kept for the next task by
``KeptGreenlets``; a daemon thread elsewhere).
"""
from __future__ import annotations

import contextvars
import functools
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, Optional

log = logging.getLogger("relay")

#: Finished greenlets ``KeptGreenlets`` keeps waiting for a task; more run at once end when done. At
#: 32, bursts of lanes at the benchmark's 32 concurrent callbacks still started a greenlet every
#: other callback.
KEPT_GREENLETS = 64


def gevent_patched() -> bool:
    """Whether gevent's monkey-patching replaced ``threading`` (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def compute_lock() -> Any:
    """A new lock for a section that never yields: the OS thread lock, also under gevent."""
    if gevent_patched():
        return sys.modules["gevent.monkey"].get_original("_thread", "allocate_lock")()
    return threading.Lock()


class KeptGreenlets:
    """Runs each task on a greenlet of its own, as ``gevent.spawn_raw`` would, but keeps up to
    ``keep`` finished greenlets waiting for the next task instead of letting them end.

    An agent's result runs on a greenlet (``relay.agents.lanes``), one per callback. A new greenlet
    maps a fresh 16 KiB stack for its Python frames, faults it in and unmaps it when it ends: on
    the benchmark VM 28 to 40 µs a task, half of it in the kernel, against 5 to 10 µs for a task
    handed to a kept greenlet (``docs/performance.md``). Each task runs in a context of its own
    (``contextvars``), as on a new greenlet. A task that raises an ``Exception`` is logged with the
    request id it ran under, and its greenlet goes on; any other ``BaseException`` ends the
    greenlet and reaches the event loop, as with ``spawn_raw``. A kept greenlet killed while it
    waits is no longer kept.
    """

    def __init__(self, keep: int = KEPT_GREENLETS) -> None:
        from gevent import get_hub, getcurrent, spawn_raw

        self._keep = keep
        self._idle: list[Any] = []
        self._get_hub, self._getcurrent, self._spawn_raw = get_hub, getcurrent, spawn_raw

    def run(self, task: Callable[[], Any]) -> None:
        """Start ``task`` at the event loop's next pass; callable from the loop itself."""
        hub = self._get_hub()
        while self._idle:
            kept = self._idle.pop()
            if kept.parent is hub and not kept.dead:
                hub.loop.run_callback(kept.switch, task)
                return
        self._spawn_raw(self._serve, task)

    def idle(self) -> int:
        """Greenlets waiting for a task."""
        return len(self._idle)

    def _serve(self, task: Optional[Callable[[], Any]]) -> None:
        hub, current = self._get_hub(), self._getcurrent()
        while task is not None:
            context = contextvars.Context()
            try:
                context.run(task)
            except Exception:
                context.run(log.exception, "background task failed", extra={"event": "background_task_failed"})
            # Nothing the task holds stays alive while this greenlet waits for the next one.
            task = None
            if len(self._idle) >= self._keep:
                return
            self._idle.append(current)
            try:
                while not callable(task):
                    task = hub.switch()
            except BaseException:
                if current in self._idle:
                    self._idle.remove(current)
                raise


@functools.cache
def kept_greenlets() -> KeptGreenlets:
    """The process's ``KeptGreenlets``, made on first use (under gevent only)."""
    return KeptGreenlets()


def spawn_thread(run: Callable[[], Any], name: str = "relay") -> None:
    """Run ``run`` on a new daemon thread; under gevent's monkey-patching, on a greenlet
    (``kept_greenlets``), not a patched ``Thread``, whose ``start`` waits until the greenlet has
    run and may not be called from the event loop, where signal handlers run."""
    if gevent_patched():
        kept_greenlets().run(run)
    else:
        threading.Thread(target=run, name=name, daemon=True).start()


def bounded_semaphore(value: int) -> Any:
    """``threading.BoundedSemaphore(value)``; under gevent, gevent's own. Patched ``threading``
    keeps its Python semaphore over gevent's locks: an acquire and release cost 2.7 µs here,
    against 0.15 µs for gevent's compiled one."""
    if gevent_patched():
        from gevent.lock import BoundedSemaphore

        return BoundedSemaphore(value)
    return threading.BoundedSemaphore(value)
