"""Gunicorn settings for the relay (``gunicorn --config config/gunicorn.py wsgi:app``).

Why ``gthread``: every agent WebSocket holds one worker thread for its whole life (flask-sock /
simple-websocket are blocking; simple-websocket adds one reader thread per socket). The threaded
worker gives each socket a real OS thread without monkey-patching, so redis-py, the WeCom client
and the stores run unchanged. Threads are cheap here: the pool starts them lazily, an idle thread
blocked in ``recv`` costs no CPU, and its stack is virtual memory touched only as far as used.

Sizing (per worker): ``RELAY_THREADS`` (default 1024) bounds the simultaneous requests, and a
WebSocket counts as one request for as long as it stays open. The default leaves room for 500+
agents plus the HTTP traffic. When every pool thread is held by a socket, new HTTP requests wait in
the pool's queue, so keep the number of agents per worker well below the thread count.
``worker_connections`` is twice the thread count: the worker stops accepting at that number, and the
difference is what it may hold as idle keep-alive connections (gunicorn needs it above ``threads``).

Agents are tracked per process. With every domain in Redis, several workers (and instances) serve
together: a machine held by another worker is reached through the bus (docs/cluster.md). With a
domain in memory, startup refuses more than one worker.

Environment: ``RELAY_HOST`` (default 0.0.0.0), ``RELAY_PORT`` (8787), ``RELAY_WORKERS`` (1),
``RELAY_THREADS`` (1024), ``RELAY_GRACEFUL_TIMEOUT_S`` (20). Bad values stop the start with a message.

Metrics: every worker writes its Prometheus values to files in ``PROMETHEUS_MULTIPROC_DIR``, and
``/metrics/prometheus`` merges them (see the hooks at the end of this file).
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise SystemExit(
            f"config/gunicorn.py: {name} must be a whole number from {low} to {high} (got {raw!r})"
        )
    return value


def _env_host(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip() or default
    if any(ch.isspace() for ch in value) or "/" in value:
        raise SystemExit(
            f"config/gunicorn.py: {name} must be a host name or IP address such as 0.0.0.0 "
            f"or 127.0.0.1 (got {value!r})"
        )
    return value


def _raise_open_file_limit(needed: int) -> None:
    """Each socket is a file descriptor: lift the soft limit towards the hard one if it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_host = _env_host("RELAY_HOST", "0.0.0.0")
_port = _env_int("RELAY_PORT", 8787, 1, 65535)

bind = [f"[{_host}]:{_port}" if ":" in _host else f"{_host}:{_port}"]
worker_class = "gthread"
workers = _env_int("RELAY_WORKERS", 1, 1, 64)
threads = _env_int("RELAY_THREADS", 1024, 4, 16384)
worker_connections = 2 * threads
# ``timeout`` is the worker heartbeat to the arbiter. The gthread main loop sends it at least once a
# second whatever the request threads do, so long-lived WebSockets never trip it.
timeout = 30
graceful_timeout = _env_int("RELAY_GRACEFUL_TIMEOUT_S", 20, 1, 600)
keepalive = 5
# The control socket's default path is one per user, so every relay on a host (the test suite starts
# several) would take it over from the others.
control_socket_disable = True

_raise_open_file_limit(worker_connections + 256)


def post_worker_init(worker: Any) -> None:
    """On SIGTERM also close the agent sockets, so the graceful stop does not wait out
    ``graceful_timeout`` for connections that never end by themselves. Agents see close code 1001
    and reconnect (to another instance, during a rolling restart)."""
    channel = getattr(worker.wsgi, "extensions", {}).get("relay.agent_channel")
    if channel is None:
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        threading.Thread(
            target=channel.close_all, args=("relay shutting down",), name="agent-shutdown",
            daemon=True,
        ).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def worker_exit(server: Any, worker: Any) -> None:
    """A worker that stops gracefully gives the sweep lease up and leaves the bus at once, so another
    process leads the sweeps at its next period instead of after the lease TTL (docs/cluster.md)."""
    relay = getattr(worker.wsgi, "extensions", {}).get("relay")
    if relay is None:
        return
    relay.sweeper.stop()
    if relay.bus is not None:
        relay.bus.stop()


# -- Prometheus multiprocess mode ------------------------------------------------------------------
# prometheus_client chooses file-backed values when it is first imported, if PROMETHEUS_MULTIPROC_DIR
# is set then; so the master sets it before any worker loads the app. Done in a hook rather than at
# import, so that reading this file (the tests do) changes nothing in the reader's environment.
_PROMETHEUS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def on_starting(server: Any) -> None:
    """Use ``PROMETHEUS_MULTIPROC_DIR`` or a fresh temporary directory, and start it empty (values
    left by an earlier master would be added to this one's)."""
    path = os.environ.get(_PROMETHEUS_DIR, "").strip()
    if not path:
        if "prometheus_client" in sys.modules:
            raise SystemExit(f"config/gunicorn.py: set {_PROMETHEUS_DIR} to a directory when the app is "
                             "preloaded (prometheus_client was imported before it could be set)")
        path = tempfile.mkdtemp(prefix="relay-prometheus-")
        server.relay_prometheus_tmpdir = path
    os.environ[_PROMETHEUS_DIR] = path
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server: Any, worker: Any) -> None:
    """Drop the dead worker's live gauges (breaker state, flags, key counts); its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the temporary metrics directory this master created (never one it was given)."""
    path = getattr(server, "relay_prometheus_tmpdir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
