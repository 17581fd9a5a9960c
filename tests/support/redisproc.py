"""A throwaway ``redis-server`` on a free loopback port, for tests and benchmarks.

Shared by ``tests/conftest.py`` and ``bench``; it imports nothing from ``relay``.
The server never persists anything (``--save "" --appendonly no``), works in its
own temporary directory and never uses port 6379, so a developer's own Redis is
never touched.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import redis

HOST = "127.0.0.1"
RESERVED_PORT = 6379


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 5.0) -> None:
    """SIGTERM every process that still runs, then SIGKILL those that do not exit in time."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def free_port() -> int:
    """A loopback TCP port that is free right now (never 6379)."""
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """``count`` different loopback TCP ports, free right now (never 6379). They are held together
    while they are picked: asked for one at a time, the same port can come back twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
            if port != RESERVED_PORT:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class RedisServer:
    """Controls one ``redis-server`` process: start, stop, pause (SIGSTOP) and resume (SIGCONT).

    The port is chosen on the first ``start()`` and kept, so a restarted server
    is found again at the same ``url``.
    """

    def __init__(self, binary: str = "redis-server", startup_timeout_s: float = 10.0,
                 unix_socket: bool = False) -> None:
        path = shutil.which(binary)
        if path is None:
            raise RedisServerError(
                f"{binary!r} is not on PATH; install it (e.g. `make redis-server` or "
                "`apt-get install redis-server`)"
            )
        self.binary = path
        self.startup_timeout_s = startup_timeout_s
        self.port: Optional[int] = None
        self._workdir = Path(tempfile.mkdtemp(prefix="relay-redis-"))
        socket_path = self._workdir / "redis.sock"
        #: With ``unix_socket``, where the server also listens (``unix_url``); ``None`` without it, or
        #: where the path would pass the OS limit (108 bytes on Linux).
        self.unix_socket: Optional[Path] = (
            socket_path if unix_socket and len(str(socket_path).encode()) < 100 else None)
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._paused = False

    # -- addressing ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("the server has not been started")
        return f"redis://{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The same server through its Unix socket (in its own working directory)."""
        if self.port is None:
            raise RedisServerError("the server has not been started")
        if self.unix_socket is None:
            raise RedisServerError("no Unix socket: not asked for, or its path would be too long")
        return f"unix://{self.unix_socket}?db=0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain redis-py client (``decode_responses=True``) for inspecting the server."""
        options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5}
        options.update(kwargs)
        return redis.Redis.from_url(self.url, **options)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    # -- process control -----------------------------------------------------------------
    def start(self) -> "RedisServer":
        """Start the server (on the same port as before, if it ran already) and wait for PING."""
        if self.running:
            return self
        attempts = 3 if self.port is None else 1
        for _ in range(attempts):
            port = self.port if self.port is not None else free_port()
            self._spawn(port)
            if self._wait_ready(port):
                self.port = port
                return self
            self._kill()
        raise RedisServerError(f"redis-server did not start; see {self._workdir / 'redis.log'}")

    def stop(self) -> None:
        """Stop the server (resuming it first if paused). Idempotent."""
        if self._proc is None:
            return
        self.resume()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): the kernel still accepts connections, nothing answers."""
        if not self.running:
            raise RedisServerError("cannot pause a server that is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        self._paused = True

    def resume(self) -> None:
        if self._paused and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _spawn(self, port: int) -> None:
        if port == RESERVED_PORT:
            raise RedisServerError("refusing to use port 6379")
        args = [
            self.binary,
            "--bind", HOST,
            "--port", str(port),
            *(("--unixsocket", str(self.unix_socket), "--unixsocketperm", "700") if self.unix_socket else ()),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(self._workdir / "redis.log"),
        ]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None
