"""SerialLanes: one task at a time per key, keys side by side, at most ``limit`` lanes at once."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from relay.agents.lanes import SerialLanes, Task
from relay.locks import spawn_thread

WAIT_S = 5.0


class Gate:
    """A task that records its name, then waits until the test lets it finish."""

    def __init__(self, done: list[str], name: str) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self._done, self._name = done, name

    def __call__(self) -> None:
        self.started.set()
        assert self.release.wait(WAIT_S)
        self._done.append(self._name)


def recorder(done: list[str], name: str) -> Task:
    return lambda: done.append(name)


def test_tasks_of_one_key_run_in_order_one_at_a_time() -> None:
    lanes, done = SerialLanes(spawn_thread, name="test"), []
    first = Gate(done, "first")
    lanes.submit("k", first)
    lanes.submit("k", recorder(done, "second"))
    lanes.submit("k", recorder(done, "third"))
    assert first.started.wait(WAIT_S)
    assert done == [] and lanes.running() == 1

    first.release.set()
    assert lanes.wait_idle(WAIT_S)
    assert done == ["first", "second", "third"]
    assert lanes.running() == 0


def test_tasks_of_other_keys_run_while_one_waits() -> None:
    lanes, done = SerialLanes(spawn_thread, name="test"), []
    slow = Gate(done, "slow")
    lanes.submit("a", slow)
    lanes.submit("b", recorder(done, "quick"))
    assert slow.started.wait(WAIT_S)
    assert not lanes.wait_idle(0.2)
    assert done == ["quick"]

    slow.release.set()
    assert lanes.wait_idle(WAIT_S)
    assert done == ["quick", "slow"]


def test_submit_waits_for_a_free_lane_beyond_the_limit() -> None:
    lanes, done = SerialLanes(spawn_thread, name="test", limit=2), []
    a, b = Gate(done, "a"), Gate(done, "b")
    lanes.submit("a", a)
    lanes.submit("b", b)
    lanes.submit("a", recorder(done, "a again"))  # joins a running lane: no new slot needed
    submitted = threading.Event()
    submitter = threading.Thread(target=lambda: (lanes.submit("c", recorder(done, "c")), submitted.set()))
    submitter.start()
    assert a.started.wait(WAIT_S) and b.started.wait(WAIT_S)
    assert not submitted.wait(0.3)

    b.release.set()
    assert submitted.wait(WAIT_S)
    a.release.set()
    assert lanes.wait_idle(WAIT_S)
    submitter.join(WAIT_S)
    assert sorted(done) == ["a", "a again", "b", "c"]
    assert done.index("a") < done.index("a again")


def test_a_failing_task_is_logged_and_its_lane_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    lanes, done = SerialLanes(spawn_thread, name="test lane"), []

    def explode() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="relay.agents"):
        lanes.submit("k", explode)
        lanes.submit("k", recorder(done, "after"))
        assert lanes.wait_idle(WAIT_S)
    assert done == ["after"]
    assert "test lane task failed: RuntimeError" in caplog.text


def test_a_lane_that_cannot_start_frees_its_key_and_slot() -> None:
    refusals = [RuntimeError("no thread")]

    def start_once_refused(run: Callable[[], None]) -> None:
        if refusals:
            raise refusals.pop()
        spawn_thread(run)

    lanes = SerialLanes(start_once_refused, name="test", limit=1)
    with pytest.raises(RuntimeError):
        lanes.submit("k", lambda: None)
    assert lanes.running() == 0 and lanes.wait_idle(0)

    done: list[str] = []
    lanes.submit("k", recorder(done, "ran"))  # would wait forever for the slot had it leaked
    assert lanes.wait_idle(WAIT_S) and done == ["ran"]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        SerialLanes(spawn_thread, name="test", limit=0)

