"""compute_lock: an OS thread lock, also under gevent's monkey-patching; bounded_semaphore: gevent's
under gevent."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from relay.locks import bounded_semaphore, compute_lock
from tests.support.live_relay import PROJECT_ROOT


def test_without_gevent_it_is_a_plain_lock_that_excludes_other_threads() -> None:
    lock = compute_lock()
    assert type(lock) is type(threading.Lock())
    got: list[bool] = []
    with lock:
        other = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.05)))
        other.start()
        other.join()
    assert got == [False]
    assert lock.acquire(timeout=0.05)
    lock.release()


UNDER_GEVENT = """
from gevent import monkey; monkey.patch_all()
import _thread, json, threading
import gevent
from relay.locks import compute_lock
from relay.stores.memory import MemoryStore

lock = compute_lock()
native = type(monkey.get_original("_thread", "allocate_lock")())
store = MemoryStore()

def work(n):
    for i in range(200):
        store.incr("counter")
        store.set(f"k{n}", str(i))
        gevent.sleep(0)

greenlets = [gevent.spawn(work, n) for n in range(50)]
gevent.joinall(greenlets, timeout=20)
print(json.dumps({"native": type(lock) is native, "patched": type(threading.Lock()) is not native,
                  "store_native": type(store._lock) is native, "done": all(g.successful() for g in greenlets),
                  "counter": store.incr("counter", 0)}))
"""


def test_under_gevent_it_is_the_os_lock_and_greenlets_share_a_memory_store() -> None:
    done = subprocess.run([sys.executable, "-c", UNDER_GEVENT], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"native": True, "patched": True, "store_native": True, "done": True, "counter": 10000}


def test_bounded_semaphore_without_gevent_is_threadings_and_refuses_an_extra_release() -> None:
    semaphore = bounded_semaphore(1)
    assert isinstance(semaphore, type(threading.BoundedSemaphore(1)))
    assert semaphore.acquire(timeout=0.05) and not semaphore.acquire(timeout=0.05)
    semaphore.release()
    with pytest.raises(ValueError):
        semaphore.release()


SEMAPHORE_UNDER_GEVENT = """
from gevent import monkey; monkey.patch_all()
import json
import gevent, gevent.lock
from relay.locks import bounded_semaphore

semaphore = bounded_semaphore(2)
order = []

def hold(n):
    with semaphore:
        order.append(("in", n))
        gevent.sleep(0.01)
        order.append(("out", n))

gevent.joinall([gevent.spawn(hold, n) for n in range(3)], timeout=10)
print(json.dumps({"gevents": isinstance(semaphore, gevent.lock.BoundedSemaphore), "third_waited": order.index(("in", 2)) > order.index(("out", 0))}))
"""


def test_bounded_semaphore_under_gevent_is_gevents_and_makes_the_third_wait() -> None:
    done = subprocess.run([sys.executable, "-c", SEMAPHORE_UNDER_GEVENT], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"gevents": True, "third_waited": True}


KEPT_UNDER_GEVENT = """
from gevent import monkey; monkey.patch_all()
import contextvars, gc, json, logging, weakref
import gevent, gevent.event
from gevent import getcurrent, get_hub
from relay.locks import KeptGreenlets, spawn_thread
from relay.telemetry import request_id

failures = []
class Keep(logging.Handler):
    def emit(self, record):
        failures.append([record.getMessage(), record.event, request_id.get()])
logging.getLogger("relay").addHandler(Keep())
marked = contextvars.ContextVar("marked", default="unset")
kept = KeptGreenlets(keep=4)
greenlets, seen = [], []

def one_after_another(count):
    for n in range(count):
        done = gevent.event.Event()
        def task(n=n, done=done):
            greenlets.append(getcurrent())
            seen.append(marked.get())
            marked.set(f"task {n}")
            request_id.set(f"request {n}")
            done.set()
            if n == 2:
                raise RuntimeError("boom")
        kept.run(task)
        done.wait(5)
        gevent.sleep(0)

one_after_another(20)
in_a_row = {"greenlets": len({id(g) for g in greenlets}), "fresh_context": seen == ["unset"] * 20,
            "idle": kept.idle()}

gevent.kill(greenlets[-1])
gevent.sleep(0)
after_kill = {"idle": kept.idle(), "dead": greenlets[-1].dead}
ran = gevent.event.Event()
kept.run(ran.set)
after_kill["next_ran"] = ran.wait(5)
gevent.sleep(0)

class Holder:
    def __call__(self):
        pass
holder = Holder()
held = weakref.ref(holder)
kept.run(holder)
del holder
gevent.sleep(0.01)
gc.collect()
let_go = held() is None

def leave():
    raise gevent.GreenletExit()
kept.run(leave)
gevent.sleep(0.01)
after_exit = {"idle": kept.idle()}

release, started = gevent.event.Event(), []
for n in range(10):
    kept.run(lambda n=n: (started.append(n), release.wait(5)))
gevent.sleep(0.05)
at_once = len(started)
release.set()
gevent.sleep(0.05)

from_loop = gevent.event.Event()
get_hub().loop.run_callback(lambda: kept.run(from_loop.set))
spawned = gevent.event.Event()
spawn_thread(spawned.set)

print(json.dumps({"in_a_row": in_a_row, "after_kill": after_kill, "let_go": let_go, "after_exit": after_exit,
                  "at_once": at_once,
                  "idle": kept.idle(), "failures": failures, "from_loop": from_loop.wait(5),
                  "spawn_thread": spawned.wait(5)}))
"""


def test_kept_greenlets_run_each_task_on_a_greenlet_kept_from_the_last_in_a_fresh_context() -> None:
    done = subprocess.run([sys.executable, "-c", KEPT_UNDER_GEVENT], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        # Twenty tasks one after another on one greenlet, none seeing the context variable the task
        # before it set; the failing third logged under its own request id, and the rest run.
        "in_a_row": {"greenlets": 1, "fresh_context": True, "idle": 1},
        "failures": [["background task failed", "background_task_failed", "request 2"]],
        # Killed while it waits, the kept greenlet is no longer kept, and the next task runs anyway.
        "after_kill": {"idle": 0, "dead": True, "next_ran": True},
        # A finished task is not held by the greenlet waiting for the next one.
        "let_go": True,
        # A task ending its greenlet (GreenletExit) leaves it out of the kept ones too.
        "after_exit": {"idle": 0},
        # Ten at once on ten greenlets; four kept when they end.
        "at_once": 10, "idle": 4, "from_loop": True, "spawn_thread": True,
    }
