"""A small Flask app around the agent channel, served by gunicorn in the channel's live tests.

``gunicorn ... 'tests.agents.app_for_tests:create_app()'``. The handler is a recording test double
(the real lifecycle lives in ``relay.lifecycle``); test-only routes under ``/_test`` expose what it
saw and let a test send frames. Channel settings come from the environment:
``AGENT_TEST_PING_S``, ``AGENT_TEST_IDLE_S``, ``AGENT_TEST_MAX_BYTES``, ``AGENT_TEST_CLOSE_GRACE_S``,
``AGENT_TEST_MAX_CONNECTIONS``, ``AGENT_TEST_RESULTS_AT_ONCE``, ``AGENT_TEST_RESULTS_DRAIN_S``.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Optional

from flask import Flask, jsonify, request

from relay.agents.channel import register_agent_channel
from relay.agents.protocol import AgentConnection
from relay.agents.sessions import SessionRegistry


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RecordingHandler:
    """Registers hellos like the lifecycle does and records every call with the scope it ran in.

    A frame carrying ``"explode": true`` makes the handler raise after recording it. A result
    carrying ``"gate": <name>`` is recorded as ``result_waiting``, then waits (at most 10 s) until
    ``/_test/gates/<name>/open`` is posted, and is recorded as ``result``.
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry
        self.events: list[dict[str, Any]] = []
        self.connections: dict[str, AgentConnection] = {}
        self._lock = threading.Lock()
        self._scope = threading.local()
        self._gates: dict[str, threading.Event] = {}

    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(name, threading.Event())

    @contextmanager
    def scope(self) -> Iterator[None]:
        self._scope.depth = getattr(self._scope, "depth", 0) + 1
        try:
            yield
        finally:
            self._scope.depth -= 1

    def _record(self, kind: str, conn: AgentConnection, frame: Optional[dict[str, Any]], **extra: Any) -> None:
        with self._lock:
            self.connections[conn.session_id] = conn
            self.events.append({
                "event": kind,
                "session": conn.session_id,
                "machine": conn.machine_id,
                "frame": frame,
                "in_scope": getattr(self._scope, "depth", 0) == 1,
                **extra,
            })
        if frame is not None and frame.get("explode") is True:
            raise RuntimeError("handler exploded (test)")

    def on_hello(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        machine_id = str(frame.get("machineId"))
        replaced = self.registry.attach(machine_id, conn)
        conn.send_json({"type": "relay.trace", "trace": {
            "direction": "relay->agent", "stage": "agent_connected",
            "machineId": machine_id, "at": _iso_now(),
        }})
        self._record("hello", conn, frame, replaced=replaced.session_id if replaced else None)

    def on_heartbeat(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        self._record("heartbeat", conn, frame)

    def on_result(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        gate = frame.get("gate")
        if isinstance(gate, str):
            self._record("result_waiting", conn, frame)
            self.gate(gate).wait(10)
        self._record("result", conn, frame)

    def on_disconnect(self, conn: AgentConnection) -> None:
        detached = conn.machine_id is not None and self.registry.detach(conn.machine_id, conn.session_id)
        self._record("disconnect", conn, None, detached=detached)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def create_app() -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    app = Flask(__name__)
    registry = SessionRegistry()
    handler = RecordingHandler(registry)
    max_connections = os.environ.get("AGENT_TEST_MAX_CONNECTIONS")
    results_at_once = os.environ.get("AGENT_TEST_RESULTS_AT_ONCE")
    results_drain_s = os.environ.get("AGENT_TEST_RESULTS_DRAIN_S")
    channel = register_agent_channel(
        app,
        registry,
        handler,
        frame_scope=handler.scope,
        ping_interval_s=_env_float("AGENT_TEST_PING_S", 25.0),
        idle_timeout_s=_env_float("AGENT_TEST_IDLE_S", 60.0),
        max_message_bytes=int(_env_float("AGENT_TEST_MAX_BYTES", 1024 * 1024)),
        close_grace_s=_env_float("AGENT_TEST_CLOSE_GRACE_S", 2.0),
        max_connections=int(max_connections) if max_connections else None,
        **({"results_at_once": int(results_at_once)} if results_at_once else {}),
        **({"results_drain_s": float(results_drain_s)} if results_drain_s else {}),
    )

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    @app.get("/_test/events")
    def events() -> Any:
        with handler._lock:
            return jsonify(events=list(handler.events))

    @app.get("/_test/registry")
    def registry_state() -> Any:
        return jsonify(
            machines={s.machine_id: s.session_id for s in registry.sessions()},
            count=registry.count(),
            open=channel.open_count(),
        )

    @app.post("/_test/gates/<name>/open")
    def open_gate(name: str) -> Any:
        handler.gate(name).set()
        return jsonify(opened=name)

    @app.post("/_test/machines/<machine_id>/send")
    def send_to_machine(machine_id: str) -> Any:
        return jsonify(sent=registry.send(machine_id, request.get_json()))

    @app.post("/_test/sessions/<session_id>/send")
    def send_to_session(session_id: str) -> Any:
        conn = handler.connections.get(session_id)
        if conn is None:
            return jsonify(error="unknown session"), 404
        return jsonify(sent=conn.send_json(request.get_json()))

    @app.post("/_test/broadcast")
    def broadcast() -> Any:
        """Send the body to every registered machine, with its machineId added."""
        frame = request.get_json()
        machine_ids = registry.machine_ids()
        failed = [m for m in machine_ids if not registry.send(m, {**frame, "machineId": m})]
        return jsonify(sent=len(machine_ids) - len(failed), failed=failed)

    return app
