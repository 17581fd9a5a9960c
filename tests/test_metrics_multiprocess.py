"""``/metrics/prometheus`` under gunicorn with two workers (config/gunicorn.py's multiprocess hooks).

Whichever worker answers a scrape must report the operations of both, once each has folded its
queued calls into its file (at most ``FOLD_INTERVAL_S`` later). The workers' metric files
are found through ``/proc/<pid>/maps`` (each worker maps its own ``*_<pid>.db`` files), which also
shows how many operations each worker did.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import FOLD_INTERVAL_S
from tests.support.live_relay import LiveRelay, live_relay
from tests.support.redisproc import RedisServer

ADMIN = "multiprocess-admin-token"
BATCH = 16
MAX_BATCHES = 20
COUNT = "relay_store_operation_seconds_count"


def relay_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"RELAY_CONNECTIONS": "16", "RELAY_ADMIN_TOKEN": ADMIN, "ALLOWLIST_USERS": "u1",
            "RATE_LIMIT_PER_MINUTE": "100000", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"), **extra}


def poll(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def mapped_metric_files(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if line.endswith(f"_{pid}.db")})


def worker_operations(directory: str, pid: int, domain: str, op: str) -> float:
    """The ``domain``/``op`` store calls one worker counted in its own histogram file."""
    path = os.path.join(directory, f"histogram_{pid}.db")
    if not os.path.exists(path):
        return 0.0
    return sum(s.value for metric in MultiProcessCollector.merge([path]) for s in metric.samples
               if s.name == COUNT and s.labels["domain"] == domain and s.labels["op"] == op)


def scraped_operations(relay: LiveRelay, domain: str, op: str) -> float:
    reply = requests.get(relay.url("/metrics/prometheus"), headers={"x-admin-token": ADMIN}, timeout=5)
    assert reply.status_code == 200
    return sum(s.value for family in text_string_to_metric_families(reply.text) for s in family.samples
               if s.name == COUNT and s.labels["domain"] == domain and s.labels["op"] == op)


def callback(relay: LiveRelay) -> None:
    reply = requests.post(relay.url("/wecom/callback"), headers={"Connection": "close"}, timeout=10,
                          json={"msgId": uuid.uuid4().hex, "userId": "u1", "text": "@dev status", "machineId": "m1"})
    assert reply.status_code == 200


def send_until_both_workers_served(relay: LiveRelay, directory: str, workers: list[int]) -> int:
    """Concurrent callbacks on fresh connections, in batches, until each worker handled some."""
    sent = 0
    with ThreadPoolExecutor(BATCH) as pool:
        for _ in range(MAX_BATCHES):
            list(pool.map(lambda _: callback(relay), range(BATCH)))
            sent += BATCH
            if all(worker_operations(directory, pid, "ratelimit", "incr") > 0 for pid in workers):
                return sent
    raise AssertionError(f"one worker served none of {sent} callbacks")


def two_workers_with_metric_files(relay: LiveRelay) -> tuple[list[int], str]:
    poll(lambda: len(relay.worker_pids()) == 2 and all(mapped_metric_files(p) for p in relay.worker_pids()))
    workers = relay.worker_pids()
    directories = {os.path.dirname(f) for pid in workers for f in mapped_metric_files(pid)}
    assert len(directories) == 1
    return workers, directories.pop()


def test_a_scrape_counts_the_operations_of_both_workers(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    env = relay_env(tmp_path, RELAY_WORKERS="2", STORE_BACKEND="redis", REDIS_URL=redis_server.url)
    with live_relay("wsgi:app", env=env) as relay:
        workers, directory = two_workers_with_metric_files(relay)
        assert os.path.basename(directory).startswith("relay-prometheus-")

        sent = send_until_both_workers_served(relay, directory, workers)

        # each worker folds its queued calls into its file within FOLD_INTERVAL_S (relay/metrics.py)
        poll(lambda: sum(worker_operations(directory, pid, "ratelimit", "incr") for pid in workers) == sent,
             timeout_s=FOLD_INTERVAL_S + 5)
        for _ in range(4):
            assert scraped_operations(relay, "ratelimit", "incr") == sent
            assert scraped_operations(relay, "idempotency", "set_if_absent") == sent

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        poll(lambda: victim not in relay.worker_pids() and len(relay.worker_pids()) == 2)
        poll(lambda: not os.path.exists(os.path.join(directory, f"gauge_livemax_{victim}.db")))
        assert os.path.exists(os.path.join(directory, f"histogram_{victim}.db"))
        assert scraped_operations(relay, "ratelimit", "incr") == sent

    assert not os.path.exists(directory)


def test_a_given_directory_is_emptied_at_start_and_kept(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    stale = directory / "counter_1.db"
    stale.write_bytes(b"\0" * 16)
    other = directory / "README"
    other.write_text("not a metrics file")

    with live_relay("wsgi:app", env=relay_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))) as relay:
        (worker,) = relay.worker_pids()
        assert not stale.exists()
        callback(relay)
        assert scraped_operations(relay, "ratelimit", "incr") == 1
        files = mapped_metric_files(worker)
        assert files and all(Path(f).parent == directory for f in files)

    assert other.exists()
