"""Gunicorn settings for the relay (``gunicorn --config config/gunicorn.py wsgi:app``).

Why ``gevent`` (the default): every agent WebSocket lives as long as the agent stays connected, and
one callback wakes several parties in turn (the request, the agent's socket reader, the result
notifier). With OS threads each hand-over is a GIL contention and a futex round trip; measured on
the callback benchmark (``make bench``), the threaded worker spent 3.1-3.9 ms of CPU per callback
against 1.3 ms under gevent, where a hand-over is a greenlet switch. gunicorn's gevent worker
monkey-patches the standard library before it loads the app, so redis-py, simple-websocket, the
WeCom client and the relay's background threads run unchanged, as greenlets.

``RELAY_WORKER_CLASS=gthread`` keeps gunicorn's threaded worker as a fallback: the same code runs
on real threads (one per connection), at the CPU cost above.

Sizing (per worker): ``RELAY_CONNECTIONS`` (default 1024; ``RELAY_THREADS`` is its former name,
still read when it is unset) bounds the simultaneous connections, and a WebSocket counts as one for
as long as it stays open. Under gevent it is ``worker_connections``; under gthread it is the thread
count, and ``worker_connections`` is twice that (the difference is what a worker may hold as idle
keep-alive connections; gunicorn needs it above ``threads``). The default leaves room for 500+
agents plus the HTTP traffic; the relay refuses agents beyond ``RELAY_CONNECTIONS`` less a reserve
for HTTP (``Settings.max_agent_connections``).

Agents are tracked per process. With every domain in Redis, several workers (and instances) serve
together: a machine held by another worker is reached through the bus (docs/cluster.md). With a
domain in memory, startup refuses more than one worker, however the count was given (``-w`` on the
command line included: ``on_starting`` checks the count gunicorn will run).

Environment: ``RELAY_HOST`` (default 0.0.0.0), ``RELAY_PORT`` (8787), ``RELAY_WORKERS`` (1),
``RELAY_WORKER_CLASS`` (gevent or gthread), ``RELAY_CONNECTIONS`` (1024),
``RELAY_GRACEFUL_TIMEOUT_S`` (20). Bad values stop the start with a message.

Metrics: every worker writes its Prometheus values to files in ``PROMETHEUS_MULTIPROC_DIR``, and
``/metrics/prometheus`` merges them (see the hooks at the end of this file).
"""
from __future__ import annotations

import gc
import os
import resource
import shutil
import signal
import sys
import tempfile
from typing import Any, Optional

from gunicorn.http import wsgi as gunicorn_wsgi


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


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip() or default
    if value not in choices:
        raise SystemExit(f"config/gunicorn.py: {name} must be one of {', '.join(choices)} (got {value!r})")
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
worker_class = _env_choice("RELAY_WORKER_CLASS", ("gevent", "gthread"), "gevent")
workers = _env_int("RELAY_WORKERS", 1, 1, 64)
_connections = _env_int("RELAY_CONNECTIONS", _env_int("RELAY_THREADS", 1024, 4, 16384), 4, 16384)
if worker_class == "gthread":
    threads = _connections
    worker_connections = 2 * _connections
else:
    worker_connections = _connections
# ``timeout`` is the worker heartbeat to the arbiter. Both worker classes send it from their own loop
# at least once a second whatever the requests do, so long-lived WebSockets never trip it.
timeout = 30
graceful_timeout = _env_int("RELAY_GRACEFUL_TIMEOUT_S", 20, 1, 600)
keepalive = 5
# The control socket's default path is one per user, so every relay on a host (the test suite starts
# several) would take it over from the others.
control_socket_disable = True

_raise_open_file_limit(worker_connections + 256)


def post_worker_init(worker: Any) -> None:
    """Read the settings once (``settings_as_attributes``), write each response's head with its
    body (``send_heads_with_bodies``), put what the worker made while starting
    out of the garbage collector's way (``freeze_startup_objects``), and on SIGTERM also close the
    agent sockets, so the graceful stop does not wait out ``graceful_timeout`` for connections that
    never end by themselves. Agents see close code 1001 and reconnect (to another instance, during a
    rolling restart)."""
    settings_as_attributes(worker.cfg)
    send_heads_with_bodies()
    freeze_startup_objects()
    channel = getattr(worker.wsgi, "extensions", {}).get("relay.agent_channel")
    if channel is None:
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        _in_background(channel.close_all, "relay shutting down")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def settings_as_attributes(cfg: Any) -> None:
    """Store each setting's value on the worker's gunicorn ``Config`` as a plain attribute.

    ``Config`` answers ``cfg.keepalive`` from ``__getattr__``, which Python calls only after the
    ordinary lookup has failed and built an ``AttributeError``; gunicorn reads some 23 settings so
    for every request. A worker's configuration does not change (a reload starts new workers), so
    the values are read once here. Names that ``Config`` defines itself (properties such as
    ``worker_class``) are left to it."""
    own = dir(type(cfg))
    cfg.__dict__.update({name: setting.get() for name, setting in cfg.settings.items() if name not in own})


class _Held:
    """Stands in for the client socket while gunicorn writes a response's head: keeps the bytes."""

    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


class OneWriteResponse(gunicorn_wsgi.Response):
    """gunicorn's response, its head (status line and headers) written with the first body bytes.

    gunicorn sends the head, then each body chunk, each with a ``sendall`` of its own: two ``send``
    calls for every one-piece body the relay answers with, and two wake-ups of the client. The head
    is kept until the body's first bytes, or until the response closes without any. Chunked bodies
    and ``sendfile`` get the head at once, as before."""

    _head: Optional[bytes] = None
    #: While ``sendfile`` runs: the file's bytes go straight to the socket, after the head.
    _head_at_once = False

    def send_headers(self) -> None:
        if self.headers_sent or self.chunked or self._head_at_once:
            super().send_headers()
            return
        sock, self.sock = self.sock, _Held()
        try:
            super().send_headers()
        finally:
            held, self.sock = self.sock, sock
        self._head = held.data

    def _emit_body(self, data: bytes) -> None:
        head, self._head = self._head, None
        if head is None:
            super()._emit_body(data)
        else:
            self._write(head + data)

    def sendfile(self, respiter: Any) -> bool:
        self._head_at_once = True
        try:
            return bool(super().sendfile(respiter))
        finally:
            self._head_at_once = False

    def close(self) -> None:
        if not self.headers_sent:
            self.send_headers()
        self._send_head()
        super().close()

    def _send_head(self) -> None:
        head, self._head = self._head, None
        if head:
            self._write(head)

    def _write(self, payload: bytes) -> None:
        """One ``send``, then ``sendall`` for what the socket buffer did not take. A response nearly
        always fits, and gevent's ``sendall`` asks the kernel for the buffer size on every call and
        loops in Python: 7.6 against 2.9 µs for a 400-byte write on the benchmark VM."""
        sent = self.sock.send(payload)
        if sent < len(payload):
            self.sock.sendall(memoryview(payload)[sent:])


def send_heads_with_bodies() -> None:
    """Make this worker's gunicorn answer with ``OneWriteResponse`` (``wsgi.create`` looks the
    response class up in its module on every request)."""
    gunicorn_wsgi.Response = OneWriteResponse


def freeze_startup_objects() -> None:
    """Move every object the worker holds now (modules, the app and its extensions: some 70,000)
    to the collector's permanent generation, after collecting what startup left as garbage.

    A full collection walks every object the collector tracks, and stops every request while it
    runs. In Redis mode a loaded worker ran one every two to three seconds, and with the startup
    objects in it each took 35 to 50 ms on the benchmark VM (``gc.callbacks`` in the worker); with
    them frozen, 2 ms. They live as long as the worker, so the collector has nothing to find there.
    """
    gc.collect()
    gc.freeze()


#: libev's ``EV_MINPRI``; libuv has no priorities, and runs its check watchers after the poll's.
LOWEST_PRIORITY = -2


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Under gevent, wait until the event loop has polled the sockets and served every connection
    with a request ready before this keep-alive connection's next request. A request already
    waiting in the socket would otherwise be read and served at once, so under saturation the
    quickest clients are served again and again while the others wait: on the callback benchmark,
    p95 67 to 75 ms and p99 94 to 122 ms, against 33 to 35 and 36 to 53 ms with a yield.

    The wait is a check watcher of the lowest priority: libev runs check watchers after each poll,
    and the lowest priority puts it after every socket the poll found ready; an idle watcher beside
    it keeps that poll from blocking in a quiet worker. ``sleep(0)`` does not
    poll first: the loop runs the callbacks it queues again before it polls, so a connection idle
    until now could still wait behind all of this one's requests. ``gevent.idle()`` waits for a
    pass with nothing else to do, which a saturated worker may not have for a long time: with the
    Redis round trips of every request on one connection (``relay/stores/redis_multiplex.py``) all
    32 benchmark clients stalled together for 100 to 150 ms a few times a second, and the Redis-mode
    p99 read 45 to 97 ms instead of 21 ms (``docs/performance.md``)."""
    if worker_class == "gevent":
        from gevent import get_hub

        hub = get_hub()
        # An active idle watcher keeps that poll from blocking when nothing else is due: this
        # connection's next request may be waiting, but its socket is not watched until then.
        awake = hub.loop.idle()
        awake.start(_nothing)
        try:
            hub.wait(hub.loop.check(priority=LOWEST_PRIORITY))
        finally:
            awake.stop()


def _nothing() -> None:
    """An idle watcher's callback: it is there only to keep the loop's poll from blocking."""


def _in_background(target: Any, *args: Any) -> None:
    """Run ``target`` off the signal handler: in a greenlet when gevent has patched threading (its
    signal handlers run in the event loop, where starting a thread would block), else in a thread."""
    from relay.locks import spawn_thread

    spawn_thread(lambda: target(*args), name="agent-shutdown")


def worker_exit(server: Any, worker: Any) -> None:
    """A worker that stops gracefully gives the sweep lease up and leaves the bus at once, so another
    process leads the sweeps at its next period instead of after the lease TTL (docs/cluster.md),
    and publishes its last store metrics. Its interpreter teardown stays quiet under gevent."""
    sys.unraisablehook = _quiet_greenlet_teardown
    relay = getattr(worker.wsgi, "extensions", {}).get("relay")
    if relay is None:
        return
    relay.sweeper.stop()
    if relay.bus is not None:
        relay.bus.stop()
    relay.metrics.stop()


def _quiet_greenlet_teardown(unraisable: Any) -> None:
    """Drop the one error gevent's teardown provokes: logging handlers freed at interpreter exit
    take logging's lock, whose owner lookup is gevent's and fails once the main greenlet is being
    finalized. Printed as an ignored exception on every worker exit, it would read like a fault."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "greenlet is being finalized" in str(error):
        return
    sys.__unraisablehook__(unraisable)


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
    _check_worker_count(server.cfg.workers)


def _check_worker_count(workers: int) -> None:
    """``-w``/``--workers`` (or ``GUNICORN_CMD_ARGS``) overrides ``RELAY_WORKERS``. Tell the settings the
    real count, so that state kept in process memory refuses several workers at startup, before
    any worker starts, and at runtime (a flag change) as well."""
    os.environ["RELAY_WORKERS"] = str(workers)
    from config.settings import ConfigError, load_settings

    try:
        load_settings(os.environ)
    except ConfigError as exc:
        raise SystemExit(f"config/gunicorn.py: {exc}") from None


def child_exit(server: Any, worker: Any) -> None:
    """Drop the dead worker's live gauges (breaker state, flags, key counts); its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the temporary metrics directory this master created (never one it was given)."""
    path = getattr(server, "relay_prometheus_tmpdir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
