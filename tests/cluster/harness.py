"""Live cluster helpers: relay instances under gunicorn on one redis-server, and agents that reconnect.

``Cluster`` starts instances with ``tests.support.live_relay.start_relay`` (each on its own free port,
``RELAY_WORKERS`` workers each) and talks to their admin routes. ``ClusterAgent`` is one agent on a
thread (websocket-client): hello, heartbeats, an answer to every command whose prompt does not
contain ``hold``, and a reconnect to the next of its URLs whenever its socket drops.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Optional

import requests
import websocket

from tests.support.helpers import race
from tests.support.live_relay import LiveRelay, start_relay

ADMIN_TOKEN = "cluster-admin"
ADMIN = {"x-admin-token": ADMIN_TOKEN}
TERMINAL = ("machine_offline", "inflight_timeout")


def is_terminal(status: str) -> bool:
    return status.startswith("agent_") or status in TERMINAL


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; return that, or the last falsy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Cluster:
    """Relay instances sharing ``env`` (one Redis); each started on a fresh port."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.instances: list[LiveRelay] = []

    def start(self, count: int) -> list[LiveRelay]:
        """Start ``count`` more instances in parallel and return them."""
        with ThreadPoolExecutor(max_workers=count) as pool:
            started = list(pool.map(lambda _: start_relay(env=self.env), range(count)))
        self.instances.extend(started)
        return started

    def ensure(self, count: int) -> list[LiveRelay]:
        """Drop instances that are not running and start new ones up to ``count``."""
        for relay in [r for r in self.instances if not r.running()]:
            self._forget(relay)
        if len(self.instances) < count:
            self.start(count - len(self.instances))
        return list(self.instances)

    def kill(self, relay: LiveRelay) -> None:
        """SIGKILL the master and its workers at once (no graceful anything)."""
        os.killpg(relay.pid, signal.SIGKILL)
        relay.process.wait(timeout=10)

    def stop_all(self) -> None:
        for relay in list(self.instances):
            relay.stop()
            self._forget(relay)

    def holding_worker(self, pid: int) -> Optional[LiveRelay]:
        """The instance one of whose workers has ``pid``."""
        return next((r for r in self.instances if pid in r.worker_pids()), None)

    def _forget(self, relay: LiveRelay) -> None:
        self.instances.remove(relay)
        relay.log_path.unlink(missing_ok=True)


def get(relay: LiveRelay, path: str) -> Any:
    reply = requests.get(relay.url(path), headers=ADMIN, timeout=10)
    reply.raise_for_status()
    return reply.json()


def post(relay: LiveRelay, path: str, body: Optional[dict[str, Any]] = None) -> requests.Response:
    return requests.post(relay.url(path), headers=ADMIN, json=body or {}, timeout=10)


def callback(relay: LiveRelay, text: str, machine_id: Optional[str], user_id: str,
             msg_id: Optional[str] = None) -> requests.Response:
    body: dict[str, Any] = {"msgId": msg_id or os.urandom(8).hex(), "userId": user_id, "text": text}
    if machine_id is not None:
        body["machineId"] = machine_id
    return requests.post(relay.url("/wecom/callback"), json=body, timeout=10)


def race_one_msg_id(relays: tuple[LiveRelay, LiveRelay], count: int, text: str, machine_id: str,
                    msg_id: str) -> list[Optional[str]]:
    """Send one msgId ``count`` times at once, alternating between ``relays``; each answer's status
    (the HTTP code when not 200, ``None`` when the request failed)."""

    def send(n: int) -> Optional[str]:
        try:
            reply = callback(relays[n % 2], text, machine_id, "dup", msg_id=msg_id)
        except requests.RequestException:
            return None
        return reply.json().get("status") if reply.status_code == 200 else str(reply.status_code)

    return race(count, send, timeout_s=60)


def statuses(relay: LiveRelay, command_id: str) -> list[str]:
    return [e["status"] for e in get(relay, f"/commands/{command_id}")["events"]]


def machine_ids(relay: LiveRelay) -> list[str]:
    return [m["machineId"] for m in get(relay, "/machines")["items"]]


class ClusterAgent:
    """One agent connected to the first reachable of ``urls`` (see the module docstring)."""

    def __init__(self, machine_id: str, urls: list[str], *, heartbeat_s: float = 1.0,
                 reconnect_s: float = 0.2, summary: str = "Patch generated successfully") -> None:
        self.machine_id = machine_id
        self.summary = summary
        self._urls = list(urls)
        self._heartbeat_s = heartbeat_s
        self._reconnect_s = reconnect_s
        self._lock = threading.Condition()
        self._frames: list[dict[str, Any]] = []
        self._ws: Optional[websocket.WebSocket] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agent-{machine_id}", daemon=True)
        self.hellos = 0

    def __enter__(self) -> "ClusterAgent":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def retarget(self, urls: list[str]) -> None:
        """Reconnect to these URLs from now on (new instances after a restart)."""
        with self._lock:
            self._urls = list(urls)

    def close(self) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            ws.close()
        self._thread.join(5)

    # -- what it received ----------------------------------------------------------------------
    def frames(self, type_: str) -> list[dict[str, Any]]:
        with self._lock:
            return [f for f in self._frames if f.get("type") == type_]

    def commands(self) -> list[dict[str, Any]]:
        return [f["command"] for f in self.frames("command")]

    def wait_connected(self, hellos: int = 1, timeout_s: float = 15.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.hellos >= hellos, timeout_s)

    # -- what it sends -------------------------------------------------------------------------
    def send_result(self, command_id: str, status: str = "ok", summary: Optional[str] = None) -> bool:
        return self._send({"type": "agent.result", "result": {
            "commandId": command_id, "machineId": self.machine_id, "status": status,
            "summary": summary or self.summary, "createdAt": _iso_now()}})

    def _send(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            ws.send(json.dumps(frame))
            return True
        except (OSError, websocket.WebSocketException):
            return False

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            with self._lock:
                url = self._urls[attempt % len(self._urls)]
            attempt += 1
            try:
                ws = websocket.create_connection(url, timeout=5)
            except (OSError, websocket.WebSocketException):
                self._stop.wait(self._reconnect_s)
                continue
            self._serve(ws)
            self._stop.wait(self._reconnect_s)

    def _serve(self, ws: websocket.WebSocket) -> None:
        self._ws = ws
        try:
            ws.settimeout(0.2)
            ws.send(json.dumps({"type": "agent.hello", "machineId": self.machine_id, "version": "cluster-test",
                                "capabilities": []}))
            with self._lock:
                self.hellos += 1
                self._lock.notify_all()
            next_heartbeat = time.monotonic() + self._heartbeat_s
            while not self._stop.is_set():
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self._heartbeat_s
                    ws.send(json.dumps({"type": "agent.heartbeat", "machineId": self.machine_id,
                                        "sentAt": _iso_now(), "runningCount": 0, "pendingCount": 0}))
                try:
                    text = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if not text:
                    return
                frame = json.loads(text)
                with self._lock:
                    self._frames.append(frame)
                    self._lock.notify_all()
                command = frame.get("command") if frame.get("type") == "command" else None
                if command and "hold" not in command.get("prompt", ""):
                    self.send_result(command["commandId"])
        except (OSError, websocket.WebSocketException, ValueError):
            return
        finally:
            self._ws = None
            ws.close()
