"""The fault-injecting proxy itself: each fault does what it says, switched on and off mid-test."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tests.support.faultproxy import FaultProxy
from tests.support.redisproc import RedisServer


class EchoServer:
    """Echoes every byte back; records when each connection's EOF arrived."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.eofs: list[float] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                return
            self.eofs.append(time.monotonic())

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as fault_proxy:
        yield fault_proxy


def connect(proxy: FaultProxy, timeout_s: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout_s)


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def test_passes_bytes_both_ways(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"hello through the proxy") == b"hello through the proxy"
    assert proxy.accepted == 1


def test_refuse_refuses_new_connections_keeps_open_ones_and_accept_listens_again(proxy: FaultProxy) -> None:
    with connect(proxy) as open_before:
        assert roundtrip(open_before) == b"ping"  # accepted (not just queued in the backlog)
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        assert roundtrip(open_before) == b"ping"
        proxy.accept()
        with connect(proxy) as sock:
            assert roundtrip(sock) == b"ping"


def test_latency_with_jitter_delays_each_direction(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.latency(60, jitter_ms=20)
        started = time.monotonic()
        assert roundtrip(sock) == b"ping"
        elapsed = time.monotonic() - started
        proxy.heal()
        assert elapsed >= 2 * 0.040  # two hops, each at least latency - jitter
        started = time.monotonic()
        roundtrip(sock)
        assert time.monotonic() - started < elapsed


def test_blackhole_accepts_but_never_answers_until_healed(proxy: FaultProxy) -> None:
    proxy.blackhole()
    with connect(proxy, timeout_s=0.3) as sock:
        sock.sendall(b"lost")
        with pytest.raises(socket.timeout):
            sock.recv(16)
        proxy.heal()
        sock.settimeout(2)
        assert roundtrip(sock, b"found") == b"found"  # the dropped bytes stay dropped


def test_reset_sends_rst_to_open_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        roundtrip(sock)
        assert proxy.reset() == 1
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(5):
                roundtrip(sock)
                time.sleep(0.05)
    assert proxy.connections == 0


def test_slow_close_delays_the_close_reaching_the_server(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.slow_close(300)
    sock = connect(proxy)
    roundtrip(sock)
    closed_at = time.monotonic()
    sock.close()
    deadline = time.monotonic() + 3
    while not echo.eofs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert echo.eofs and echo.eofs[0] - closed_at >= 0.25


def test_reset_on_reply_applies_the_write_and_loses_the_answer(redis_server: RedisServer) -> None:
    direct = redis_server.client()
    with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis.from_url(proxy.redis_url(), socket_timeout=1, decode_responses=True)
        assert client.ping()
        proxy.reset_on_reply()
        with pytest.raises(redis.ConnectionError):
            client.set("written-blind", "yes")
        assert direct.get("written-blind") == "yes"
        proxy.heal()
        assert client.get("written-blind") == "yes"  # redis-py reconnects on the next command
        client.close()
    direct.close()


def test_connections_are_bounded(echo: EchoServer) -> None:
    with FaultProxy(echo.port, max_connections=2) as proxy:
        first, second = connect(proxy), connect(proxy)
        assert roundtrip(first) == b"ping" and roundtrip(second) == b"ping"
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            with connect(proxy) as third:
                roundtrip(third)
                roundtrip(third)
        first.close()
        second.close()


def test_only_loopback_upstreams() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(6380, upstream_host="10.0.0.1")
