"""A fault-injecting TCP proxy for tests: it sits between a client and one loopback server (a
redis-server, say) and misbehaves on demand, like a small Toxiproxy.

    with FaultProxy(redis_server.port) as proxy:
        relay_env = {"REDIS_URL": proxy.redis_url()}
        proxy.blackhole()          # accept, never answer
        proxy.heal()               # everything passes again

Faults, each switchable at any moment and all cleared by ``heal()``:

* ``refuse()``: stop listening, so new connections are refused (``ECONNREFUSED``); open ones carry on.
  The port stays reserved by a bound, non-listening socket, so nothing else can take it meanwhile.
* ``latency(ms, jitter_ms)``: every chunk, in both directions, waits ``ms`` ± ``jitter_ms``.
* ``blackhole()``: connections are accepted and kept open, and every byte in either direction is
  dropped, new connections included (a hung server, a partition that does not reset).
* ``reset()``: one shot, every open connection is reset (RST) at once.
* ``reset_on_reply()``: requests reach the server, and the connection is reset as the reply comes
  back, so the client never learns whether its write happened.
* ``slow_close(ms)``: a close by either side reaches the other side ``ms`` later.

Threads, one listener plus two pumps per connection, at most ``max_connections`` connections;
the proxy listens on 127.0.0.1 only and forwards to a loopback address only.
"""
from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

HOST = "127.0.0.1"
CHUNK = 65536


@dataclass(frozen=True)
class Faults:
    """The faults in force; pumps read one snapshot per chunk."""

    blackhole: bool = False
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    reset_on_reply: bool = False
    slow_close_ms: float = 0.0

    def delay_s(self, rand: random.Random) -> float:
        if self.latency_ms <= 0 and self.jitter_ms <= 0:
            return 0.0
        return max(0.0, self.latency_ms + rand.uniform(-self.jitter_ms, self.jitter_ms)) / 1000.0


def _reusable_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN. ``SHUT_RD`` first wakes a thread blocked reading it (a
    plain close would wait for that read to return before the socket really goes)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class _Link:
    """One proxied connection: the client's socket, the server's socket and their two pumps."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self._lock = threading.Lock()
        self._closed = False
        self._half_closed = 0
        self._threads = [
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True, name="faultproxy-up"),
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True, name="faultproxy-down"),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _pump(self, source: socket.socket, target: socket.socket, is_reply: bool) -> None:
        rand = random.Random()
        try:
            while True:
                data = source.recv(CHUNK)
                faults = self.proxy.faults
                if self._closed:
                    return
                if not data:
                    self._forward_close(target, faults)
                    return
                if faults.blackhole:
                    continue
                if is_reply and faults.reset_on_reply:
                    self.reset()
                    return
                delay = faults.delay_s(rand)
                if delay:
                    time.sleep(delay)
                target.sendall(data)
        except OSError:
            self.close()

    def _forward_close(self, target: socket.socket, faults: Faults) -> None:
        if faults.slow_close_ms > 0:
            time.sleep(faults.slow_close_ms / 1000.0)
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            self._half_closed += 1
            done = self._half_closed == 2
        if done:
            self.close()

    def reset(self) -> None:
        """RST the client, close the server side."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _reset(self.client)
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        self.proxy._forget(self)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.proxy._forget(self)


class FaultProxy:
    """A TCP proxy on ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` (see the module docstring)."""

    def __init__(self, upstream_port: int, upstream_host: str = HOST, *, max_connections: int = 256,
                 connect_timeout_s: float = 2.0) -> None:
        if not ipaddress.ip_address(upstream_host).is_loopback:
            raise ValueError("the fault proxy forwards to loopback addresses only")
        self.upstream = (upstream_host, upstream_port)
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.faults = Faults()
        self.accepted = 0
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._holder = _reusable_socket()
        self._holder.bind((HOST, 0))
        self.port: int = self._holder.getsockname()[1]
        self._listener: Optional[socket.socket] = None
        self._listening = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy-accept")

    # -- addressing ----------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    def redis_url(self, db: int = 0, scheme: str = "redis", userinfo: str = "") -> str:
        """A Redis URL through the proxy, e.g. ``redis://127.0.0.1:<port>/0``."""
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}{HOST}:{self.port}/{db}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._listen()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, reset every connection and release the port."""
        self._stopped.set()
        self._unlisten()
        self._listening.set()
        self._thread.join(timeout=5)
        for link in self._snapshot():
            link.close()
        self._holder.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- faults ---------------------------------------------------------------------------------
    def heal(self) -> None:
        """Clear every fault and listen again."""
        self.faults = Faults()
        self.accept()

    def refuse(self) -> None:
        self._unlisten()

    def accept(self) -> None:
        """Listen again after ``refuse``."""
        if self._listener is None and not self._stopped.is_set():
            self._listen()

    def latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        if ms < 0 or jitter_ms < 0:
            raise ValueError("latency and jitter must not be negative")
        self.faults = replace(self.faults, latency_ms=ms, jitter_ms=jitter_ms)

    def blackhole(self) -> None:
        self.faults = replace(self.faults, blackhole=True)

    def reset(self) -> int:
        """Reset every open connection now; return how many there were."""
        links = self._snapshot()
        for link in links:
            link.reset()
        return len(links)

    def reset_on_reply(self) -> None:
        self.faults = replace(self.faults, reset_on_reply=True)

    def slow_close(self, ms: float) -> None:
        if ms < 0:
            raise ValueError("the close delay must not be negative")
        self.faults = replace(self.faults, slow_close_ms=ms)

    # -- internals ------------------------------------------------------------------------------
    def _listen(self) -> None:
        listener = _reusable_socket()
        listener.bind((HOST, self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        with self._lock:
            self._listener = listener
        self._listening.set()

    def _unlisten(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            self._listening.clear()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # stops listening now, and wakes accept()
            except OSError:
                pass
            listener.close()

    def _snapshot(self) -> list[_Link]:
        with self._lock:
            return list(self._links)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            self._listening.wait()
            listener = self._listener
            if listener is None:
                continue
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                continue  # the listener was closed by refuse()
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.settimeout(None)
        with self._lock:
            full = len(self._links) >= self.max_connections
        if full:
            _reset(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=self.connect_timeout_s)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(self, client, server)
        with self._lock:
            self._links.add(link)
            self.accepted += 1
        link.start()
