"""compute_lock: an OS thread lock, also under gevent's monkey-patching."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

from relay.locks import compute_lock
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
