"""Worker class and sizing (config/gunicorn.py), and 500 agents on one worker with HTTP traffic alongside."""
from __future__ import annotations

import resource
import runpy
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.support.agent_swarm import AgentSwarm
from tests.support.live_relay import PROJECT_ROOT, TEST_APP, RelayStartError, live_relay, start_relay

AGENTS = 500


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = AGENTS * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else wanted, hard))


def _poll(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


GUNICORN_CONFIG = str(Path(PROJECT_ROOT) / "config" / "gunicorn.py")
RELAY_VARIABLES = ("RELAY_HOST", "RELAY_PORT", "RELAY_WORKERS", "RELAY_WORKER_CLASS", "RELAY_CONNECTIONS",
                   "RELAY_THREADS", "RELAY_GRACEFUL_TIMEOUT_S")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in RELAY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_gunicorn_defaults_are_one_gevent_worker_sized_for_agents(clean_env: pytest.MonkeyPatch) -> None:
    config = runpy.run_path(GUNICORN_CONFIG)

    assert config["bind"] == ["0.0.0.0:8787"]
    assert config["worker_class"] == "gevent"
    assert config["workers"] == 1
    assert config["worker_connections"] == 1024
    assert "threads" not in config
    assert config["graceful_timeout"] == 20


def test_gunicorn_settings_come_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {"RELAY_HOST": "::1", "RELAY_PORT": "9000", "RELAY_WORKERS": "2",
                        "RELAY_CONNECTIONS": "64", "RELAY_GRACEFUL_TIMEOUT_S": "5"}.items():
        clean_env.setenv(name, value)

    config = runpy.run_path(GUNICORN_CONFIG)

    assert config["bind"] == ["[::1]:9000"]
    assert (config["workers"], config["worker_connections"], config["graceful_timeout"]) == (2, 64, 5)


def test_the_threaded_worker_takes_one_thread_per_connection(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELAY_WORKER_CLASS", "gthread")
    clean_env.setenv("RELAY_CONNECTIONS", "64")

    config = runpy.run_path(GUNICORN_CONFIG)

    assert (config["worker_class"], config["threads"], config["worker_connections"]) == ("gthread", 64, 128)


def test_relay_threads_is_read_when_relay_connections_is_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELAY_THREADS", "96")
    assert runpy.run_path(GUNICORN_CONFIG)["worker_connections"] == 96

    clean_env.setenv("RELAY_CONNECTIONS", "48")
    assert runpy.run_path(GUNICORN_CONFIG)["worker_connections"] == 48


@pytest.mark.parametrize("name, value, accepted", [
    ("RELAY_PORT", "http", "from 1 to 65535"),
    ("RELAY_PORT", "70000", "from 1 to 65535"),
    ("RELAY_CONNECTIONS", "1e3", "from 4 to 16384"),
    ("RELAY_THREADS", "3", "from 4 to 16384"),
    ("RELAY_WORKER_CLASS", "eventlet", "one of gevent, gthread"),
    ("RELAY_WORKERS", "0", "from 1 to 64"),
    ("RELAY_GRACEFUL_TIMEOUT_S", "-1", "from 1 to 600"),
    ("RELAY_HOST", "local host", "host name or IP address"),
])
def test_bad_gunicorn_settings_stop_with_a_message_naming_the_variable(
    clean_env: pytest.MonkeyPatch, name: str, value: str, accepted: str
) -> None:
    clean_env.setenv(name, value)

    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(GUNICORN_CONFIG)

    assert name in str(stopped.value) and accepted in str(stopped.value) and repr(value) in str(stopped.value)


def test_gunicorn_refuses_to_start_on_a_bad_value() -> None:
    with pytest.raises(RelayStartError) as failed:
        start_relay(TEST_APP, env={"RELAY_CONNECTIONS": "many"}, startup_timeout_s=15)
    assert "RELAY_CONNECTIONS must be a whole number from 4 to 16384 (got 'many')" in str(failed.value)


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_500_agents_on_one_worker_all_registered_all_reachable_while_http_works(worker_class: str) -> None:
    _raise_open_file_limit()
    env = {"RELAY_WORKERS": "1", "RELAY_CONNECTIONS": "1024", "RELAY_WORKER_CLASS": worker_class}
    with live_relay(TEST_APP, env=env) as relay:
        session = requests.Session()

        def registered() -> int:
            return int(session.get(relay.url("/_test/registry"), timeout=10).json()["count"])

        with AgentSwarm(relay.agent_url, AGENTS, prefix="cap", heartbeat_s=2.0) as swarm:
            assert swarm.wait_until(lambda s: s.count("open") == AGENTS, 20), swarm.count("open")
            assert _poll(lambda: registered() == AGENTS, 10)

            statuses: list[int] = []

            def http_traffic() -> None:
                with requests.Session() as http:
                    for _ in range(200):
                        statuses.append(http.get(relay.url("/healthz"), timeout=5).status_code)

            traffic = threading.Thread(target=http_traffic)
            traffic.start()
            sent = session.post(relay.url("/_test/broadcast"), json={"type": "command", "command": {"kind": "status"}},
                                timeout=30).json()
            traffic.join(30)

            assert sent == {"sent": AGENTS, "failed": []}
            assert swarm.wait_until(
                lambda s: s.agents_that_received(lambda f: f.get("type") == "command") == AGENTS, 10)
            assert all(f.get("machineId") == "cap-7" for f in swarm.received("cap-7") if f.get("type") == "command")
            assert statuses == [200] * 200
            (worker,) = relay.worker_stats()
            if worker_class == "gthread":
                # one pool thread and one simple-websocket reader thread per socket, and little else
                assert 2 * AGENTS <= worker.threads <= 2 * AGENTS + 64
            else:
                # greenlets: the sockets and their readers take no OS thread
                assert worker.threads <= 16
            assert swarm.count("closed") == 0

        assert _poll(lambda: registered() == 0, 10)
        if worker_class == "gthread":
            # the reader threads end with their sockets; the pool keeps its idle threads
            assert _poll(lambda: relay.worker_stats()[0].threads <= AGENTS + 64, 10)


def test_workers_given_on_the_command_line_are_checked_like_relay_workers() -> None:
    try:
        started = start_relay(TEST_APP, env={"RELAY_WORKERS": "1", "STORE_PHASE": "memory"},
                              extra_args=("-w", "2"), startup_timeout_s=15)
    except RelayStartError as failed:
        assert "RELAY_WORKERS" in str(failed) and "process memory" in str(failed)
    else:
        started.stop()
        pytest.fail("two workers started with the state in process memory")
