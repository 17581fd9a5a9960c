"""A real relay under gunicorn (``config/gunicorn.py``) on a free 127.0.0.1 port, for live tests.

    with live_relay("wsgi:app", env={"STORE_MODE": "redis", "REDIS_URL": url}) as relay:
        requests.get(relay.url("/healthz"))
        websocket.create_connection(relay.agent_url)

The process inherits this environment plus ``env``; ``RELAY_HOST``/``RELAY_PORT`` are set by the
harness. Start-up waits for ``GET /healthz`` to answer 200; ``stop()`` sends SIGTERM, then SIGKILL
to the process group after ``stop_timeout_s``. Output goes to a log file readable with ``logs()``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import requests

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_APP = "tests.agents.app_for_tests:create_app()"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class RelayStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProcessStats:
    pid: int
    rss_kib: int
    threads: int
    open_fds: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessTimes(NamedTuple):
    """CPU seconds in user and in kernel mode, and minor page faults, of a process or several."""

    user_s: float
    system_s: float
    minor_faults: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    def since(self, before: ProcessTimes) -> ProcessTimes:
        return ProcessTimes(self.user_s - before.user_s, self.system_s - before.system_s,
                            self.minor_faults - before.minor_faults)

    def plus(self, other: ProcessTimes) -> ProcessTimes:
        return ProcessTimes(self.user_s + other.user_s, self.system_s + other.system_s,
                            self.minor_faults + other.minor_faults)


def process_times(*pids: int) -> ProcessTimes:
    """``ProcessTimes`` of ``pids`` together, from ``/proc/<pid>/stat`` (Linux)."""
    user = system = faults = 0
    for pid in pids:
        # the command name is in parentheses and may contain spaces: split after it
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        faults, user, system = faults + int(fields[7]), user + int(fields[11]), system + int(fields[12])
    return ProcessTimes(user / CLOCK_TICKS, system / CLOCK_TICKS, faults)


def process_stats(pid: int) -> ProcessStats:
    """RSS, thread count and open descriptors of a process, from ``/proc`` (Linux)."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    rss_kib = int(fields.get("VmRSS", "0 kB").split()[0])
    return ProcessStats(pid, rss_kib, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd")))


def _gunicorn_command() -> list[str]:
    venv_gunicorn = PROJECT_ROOT / ".venv" / "bin" / "gunicorn"
    if venv_gunicorn.exists():
        return [str(venv_gunicorn)]
    found = shutil.which("gunicorn")
    return [found] if found else [sys.executable, "-m", "gunicorn"]


class LiveRelay:
    """One running gunicorn master (and its workers)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.agent_url = f"{self.ws_url}/agent"

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """Children of the master (the workers), from ``/proc``."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the command name is in parentheses and may contain spaces: split after it
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def times(self) -> ProcessTimes:
        """``ProcessTimes`` of the master and every worker together."""
        return process_times(self.pid, *self.worker_pids())

    def worker_stats(self) -> list[ProcessStats]:
        return [process_stats(pid) for pid in self.worker_pids()]

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, stop_timeout_s: float = 15.0) -> float:
        """SIGTERM, wait, then SIGKILL the process group; return the seconds the stop took."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return time.monotonic() - started


def start_relay(
    app: str = "wsgi:app",
    *,
    env: Optional[Mapping[str, str]] = None,
    startup_timeout_s: float = 30.0,
    extra_args: tuple[str, ...] = (),
    launcher: tuple[str, ...] = (),
) -> LiveRelay:
    """Start gunicorn with ``app`` (a gunicorn app spec) and wait until ``/healthz`` answers 200.
    ``launcher`` is a command gunicorn runs under (the instruction-count benchmark's valgrind)."""
    last_error: Optional[RelayStartError] = None
    for _attempt in range(3):
        try:
            return _start_once(app, env or {}, startup_timeout_s, extra_args, launcher)
        except RelayStartError as exc:
            last_error = exc
            if "Address already in use" not in str(exc):
                raise
    assert last_error is not None
    raise last_error


def _start_once(
    app: str, env: Mapping[str, str], startup_timeout_s: float, extra_args: tuple[str, ...],
    launcher: tuple[str, ...] = (),
) -> LiveRelay:
    port = free_port()
    process_env = dict(os.environ)
    process_env.update({"RELAY_GRACEFUL_TIMEOUT_S": "10", "PYTHONUNBUFFERED": "1"})
    process_env.update(env)
    process_env.update({"RELAY_HOST": "127.0.0.1", "RELAY_PORT": str(port)})
    process_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), process_env.get("PYTHONPATH", "")) if p
    )
    log_fd, log_name = tempfile.mkstemp(prefix="live-relay-", suffix=".log")
    log_path = Path(log_name)
    command = [*launcher, *_gunicorn_command(), "--config", "config/gunicorn.py", *extra_args, app]
    with os.fdopen(log_fd, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=process_env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    relay = LiveRelay(process, port, log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = relay.logs()[-4000:]
            log_path.unlink(missing_ok=True)
            raise RelayStartError(f"gunicorn exited with {process.returncode}:\n{output}")
        try:
            if requests.get(relay.url("/healthz"), timeout=1).status_code == 200:
                return relay
        except requests.RequestException:
            pass
        time.sleep(0.05)
    relay.stop()
    output = relay.logs()[-4000:]
    log_path.unlink(missing_ok=True)
    raise RelayStartError(f"no 200 from /healthz within {startup_timeout_s} s:\n{output}")


@contextmanager
def live_relay(
    app: str = "wsgi:app",
    *,
    env: Optional[Mapping[str, str]] = None,
    startup_timeout_s: float = 30.0,
    extra_args: tuple[str, ...] = (),
    launcher: tuple[str, ...] = (),
) -> Iterator[LiveRelay]:
    """``start_relay`` as a context manager: always stopped, log file removed afterwards."""
    relay = start_relay(app, env=env, startup_timeout_s=startup_timeout_s, extra_args=extra_args,
                        launcher=launcher)
    try:
        yield relay
    finally:
        relay.stop()
        relay.log_path.unlink(missing_ok=True)
