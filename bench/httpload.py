"""A small HTTP/1.1 keep-alive client and a bounded concurrent load runner for the benchmarks.

``requests`` costs the load generator several hundred microseconds of CPU per call, which on a
2-core machine is taken from the relay being measured. ``HttpClient`` writes a prebuilt request on
one socket and parses only the status line and ``Content-Length``, a few tens of microseconds.
"""
from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Optional

#: ``(index) -> (path, body)``: the request number ``index`` of a run.
RequestMaker = Callable[[int], tuple[str, bytes]]
#: ``(status, body) -> ok``: whether an answer counts as a success.
Check = Callable[[int, bytes], bool]


class HttpClient:
    """One keep-alive connection to ``127.0.0.1:port``; reconnects when the server closes it."""

    def __init__(self, port: int, headers: Optional[Mapping[str, str]] = None, timeout_s: float = 10.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._head = f"Host: 127.0.0.1:{port}\r\n{extra}"
        self._sock: Optional[socket.socket] = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buffer = sock, b""
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, method: str, path: str, body: bytes = b"",
                content_type: str = "application/json") -> tuple[int, bytes]:
        """Send one request and return ``(status, body)``; raises ``OSError`` on a broken connection."""
        head = f"{method} {path} HTTP/1.1\r\n{self._head}"
        if body or method == "POST":
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        sock = self._sock or self._connect()
        try:
            sock.sendall(head.encode("latin-1") + b"\r\n" + body)
            return self._response()
        except OSError:
            self.close()
            raise

    def _read_more(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        self._buffer += chunk

    def _response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self._buffer:
            self._read_more()
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        self._buffer = rest
        while len(self._buffer) < length:
            self._read_more()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        if close:
            self.close()
        return status, body


@dataclass
class LoadResult:
    """What one load run measured: successes, failures, wall time and latencies (ms) of successes."""

    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_kinds: set[str] = field(default_factory=set)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def percentile(samples: list[float], q: float) -> Optional[float]:
    """The ``q``-th percentile (nearest rank) of ``samples``, or ``None`` when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_load(port: int, make: RequestMaker, check: Check, *, total: int, concurrency: int,
             max_seconds: float, first: int = 0, headers: Optional[Mapping[str, str]] = None) -> LoadResult:
    """Requests ``first .. first+total-1`` over ``concurrency`` keep-alive clients, stopping after
    ``max_seconds``; each client sends its next request as soon as the previous one is answered."""
    result = LoadResult()
    lock = threading.Lock()
    numbers = itertools.count(first)
    last = first + total
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        http = HttpClient(port, headers)
        latencies: list[float] = []
        ok = errors = 0
        kinds: set[str] = set()
        try:
            for index in numbers:
                if index >= last or time.monotonic() > deadline:
                    break
                path, body = make(index)
                started = time.perf_counter()
                try:
                    status, payload = http.request("POST", path, body)
                except OSError as exc:
                    errors += 1
                    kinds.add(type(exc).__name__)
                    continue
                elapsed = (time.perf_counter() - started) * 1000
                if check(status, payload):
                    ok += 1
                    latencies.append(elapsed)
                else:
                    errors += 1
                    kinds.add(f"{status}:{payload[:60]!r}")
        finally:
            http.close()
            with lock:
                result.ok += ok
                result.errors += errors
                result.latencies_ms += latencies
                result.error_kinds |= kinds

    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result
