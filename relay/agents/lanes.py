"""``SerialLanes``: tasks run one at a time per key, in the order they were submitted, while tasks of
different keys run side by side.

Two users:

* the agent channel (``relay.agents.channel``) hands each ``agent.result`` frame to a lane keyed by
  its command id. A result waits for the store's round trips (three in Redis mode); handled one
  after another on the socket's own thread, an agent answering many commands fell behind: at
  saturation its results queued in the socket for seconds while callbacks were served at once.
  In lanes, results of different commands overlap, and those of one command keep their order (a
  progress summary never lands after the final one). ``limit`` bounds the lanes of one socket:
  when that many run, the socket's reader waits for one to finish, and TCP holds the agent back;
* the agent bus (``relay.agents.bus``) sends each machine's frames one at a time on a thread pool.

``start(run)`` decides where a lane runs: ``ThreadPoolExecutor.submit`` (the bus), or
``relay.locks.spawn_thread`` (the channel: a thread of its own, under gunicorn's gevent worker a
greenlet).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Optional

from relay.locks import bounded_semaphore, compute_lock

log = logging.getLogger("relay.agents")

Task = Callable[[], None]


class SerialLanes:
    """Tasks in lanes by key (see the module docstring). A task that raises is logged as
    ``<name> task failed`` and its lane goes on with the next one."""

    def __init__(self, start: Callable[[Task], Any], name: str, limit: Optional[int] = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        self._start = start
        self.name = name
        self._lock = compute_lock()
        self._lanes: dict[Hashable, deque[Task]] = {}
        self._slots = bounded_semaphore(limit) if limit is not None else None
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, key: Hashable, task: Task) -> None:
        """Queue ``task`` behind the running tasks of ``key``, or start a lane for it; with ``limit``
        lanes running, wait for one to end first."""
        if self._join(key, task):
            return
        if self._slots is not None:
            self._slots.acquire()
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                self._lanes[key] = deque([task])
                self._idle.clear()
        if lane is not None:
            # Another submitter opened the lane while this one waited for a slot.
            lane.append(task)
            self._release_slot()
            return
        try:
            self._start(lambda: self._drain(key))
        except BaseException:
            with self._lock:
                del self._lanes[key]
                if not self._lanes:
                    self._idle.set()
            self._release_slot()
            raise

    def running(self) -> int:
        """Lanes with a task running or queued."""
        return len(self._lanes)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no lane has a task left, at most ``timeout_s``; ``False`` if some still had."""
        return self._idle.wait(timeout_s)

    def _join(self, key: Hashable, task: Task) -> bool:
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                return False
            lane.append(task)
            return True

    def _drain(self, key: Hashable) -> None:
        try:
            while True:
                with self._lock:
                    lane = self._lanes[key]
                    if not lane:
                        del self._lanes[key]
                        if not self._lanes:
                            self._idle.set()
                        return
                    task = lane.popleft()
                try:
                    task()
                except Exception as exc:  # noqa: BLE001 - one failed task must not stop its lane
                    log.error("%s task failed: %s", self.name, type(exc).__name__,
                              extra={"event": "lane_task_failed", "lane": self.name})
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

