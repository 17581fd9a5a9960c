"""The agent WebSocket route (``/agent``) and its per-connection loop.

The route builds the simple-websocket server (``AgentServer``, whose reader decodes the common frames
itself) rather than through ``flask_sock.Sock.route``: that wrapper constructs the server before any
code of ours runs, so it could neither answer a plain or malformed request with the reference's
responses, nor hand simple-websocket the tracked socket (locked whole-frame writes, send timeout,
activity stamps), nor refuse permessage-deflate (the reference runs without it, and each compressing
socket would keep its own zlib state). The hand-over to gunicorn after the socket ends is the one
flask-sock uses.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Optional

from flask import Flask, Response, request
from simple_websocket import ConnectionClosed
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ProtocolError

from relay.agents.auth import CLOSE_UNAUTHORIZED, AgentAuth
from relay.agents.frames import AgentServer
from relay.agents.lanes import SerialLanes
from relay.agents.protocol import AgentConnection, AgentEventHandler
from relay.agents.sessions import AgentSession, Message, SessionRegistry, TrackedSocket
from relay.ids import valid_id
from relay.jsontext import parse_strict
from relay.locks import spawn_thread

log = logging.getLogger("relay.agents")

AGENT_PATH = "/agent"
#: Extension key under which the channel is stored on the Flask app (see config/gunicorn.py).
EXTENSION_KEY = "relay.agent_channel"

FrameScope = Callable[[], AbstractContextManager[Any]]

_ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@dataclass(frozen=True)
class ChannelSettings:
    ping_interval_s: float
    idle_timeout_s: float
    max_message_bytes: int
    #: Bound on one blocking write to an agent that does not read.
    send_timeout_s: float = 10.0
    #: How long a closing socket waits for the agent's close frame before it is cut.
    close_grace_s: float = 2.0
    #: Open agent sockets allowed in this process (each holds a worker thread); ``None``: no limit.
    max_connections: Optional[int] = None
    #: Results of one socket handled at once, each command's in order (``relay.agents.lanes``).
    results_at_once: int = 8
    #: How long a closed socket's results may still run before the handler hears of the disconnect.
    results_drain_s: float = 10.0

    def __post_init__(self) -> None:
        if self.ping_interval_s <= 0:
            raise ValueError("ping_interval_s must be > 0")
        if self.idle_timeout_s <= self.ping_interval_s:
            raise ValueError("idle_timeout_s must be greater than ping_interval_s")
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be > 0")
        if self.send_timeout_s <= 0 or self.close_grace_s < 0:
            raise ValueError("send_timeout_s must be > 0 and close_grace_s >= 0")
        if self.max_connections is not None and self.max_connections <= 0:
            raise ValueError("max_connections must be > 0")
        if self.results_at_once < 1 or self.results_drain_s < 0:
            raise ValueError("results_at_once must be >= 1 and results_drain_s >= 0")


class AgentChannel:
    """Accepts agent sockets and feeds their frames to the ``AgentEventHandler``.

    Before the handler sees them: a hello must carry a valid machine id (``relay.ids``) and, with
    agent authentication on, a valid token, else the socket is closed with 4401; a result must
    carry a valid command id. The token is taken out of the frame and never logged.

    Frames are handled in the order they arrive, on the socket's thread, except results: each goes
    to a lane of its command (``relay.agents.lanes``), so that results of different commands are
    handled side by side (at most ``results_at_once``; the reader waits for a free lane beyond
    that) and those of one command in order. A closing socket's results finish (at most
    ``results_drain_s``) before the handler hears of the disconnect.
    """

    def __init__(
        self,
        registry: SessionRegistry,
        handler: AgentEventHandler,
        frame_scope: FrameScope,
        settings: ChannelSettings,
        auth: Optional[AgentAuth] = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._handler = handler
        self._frame_scope = frame_scope
        self._auth = auth or AgentAuth()
        self._lock = threading.Lock()
        self._open: set[AgentSession] = set()
        self._reserved = 0
        self._stopping = False
        self._routes: dict[str, Callable[[AgentConnection, dict[str, Any]], None]] = {
            "agent.hello": handler.on_hello,
            "agent.heartbeat": handler.on_heartbeat,
            "agent.result": handler.on_result,
        }

    def open_count(self) -> int:
        """Sockets open in this process, with or without a hello."""
        with self._lock:
            return len(self._open)

    def close_all(self, reason: str) -> None:
        """Close every open socket with 1001 (going away), and any opened later, when the worker stops."""
        with self._lock:
            self._stopping = True
            sessions = list(self._open)
        for session in sessions:
            session.close(reason, CloseReason.GOING_AWAY)

    def endpoint(self) -> Response:
        """The Flask view for ``/agent`` (every method)."""
        environ = request.environ
        target = _raw_target(environ)
        if request.method != "GET" or target != AGENT_PATH or not _asks_for_websocket(environ):
            return _fastify_error(404, f"Route {request.method}:{target} not found")
        if not self._reserve():
            return _fastify_error(503, "Too many agent connections")
        try:
            server, tracked = self._accept(environ)
        except (ProtocolError, RuntimeError) as exc:
            self._unreserve()
            log.info("agent handshake refused: %s", type(exc).__name__)
            return _fastify_error(400, "Invalid WebSocket handshake")
        except OSError as exc:
            self._unreserve()
            log.info("agent handshake failed: %s", type(exc).__name__)
            return _UpgradedResponse("gunicorn" if "gunicorn.socket" in environ else "werkzeug")
        session = AgentSession(server, tracked, remote_addr=environ.get("REMOTE_ADDR"))
        with self._lock:
            self._reserved -= 1
            self._open.add(session)
            stopping = self._stopping
        if stopping:
            session.close("relay shutting down", CloseReason.GOING_AWAY)
        try:
            self._serve(session, environ.get("HTTP_AUTHORIZATION"))
        except Exception as exc:  # noqa: BLE001 - the socket is no HTTP connection any more
            log.error("agent socket loop failed: %s at %s (session %s)", type(exc).__name__,
                      _raise_site(exc), session.session_id, extra=_ids(session))
        finally:
            with self._lock:
                self._open.discard(session)
        return _UpgradedResponse(server.mode)

    def _reserve(self) -> bool:
        with self._lock:
            limit = self.settings.max_connections
            if limit is not None and len(self._open) + self._reserved >= limit:
                return False
            self._reserved += 1
            return True

    def _unreserve(self) -> None:
        with self._lock:
            self._reserved -= 1

    def _accept(self, environ: dict[str, Any]) -> tuple[AgentServer, TrackedSocket]:
        """Complete the handshake on a copy of the environ: tracked socket in, deflate offer out."""
        ws_environ = dict(environ)
        ws_environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        key = "werkzeug.socket" if "werkzeug.socket" in environ else "gunicorn.socket"
        raw = environ.get(key)
        if raw is None:
            raise RuntimeError("the WSGI server does not expose the client socket")
        tracked = TrackedSocket(raw, send_timeout_s=self.settings.send_timeout_s)
        ws_environ[key] = tracked
        server = AgentServer(ws_environ, max_message_size=self.settings.max_message_bytes)
        return server, tracked

    def _serve(self, session: AgentSession, authorization: Optional[str] = None) -> None:
        """Handle frames in order until the socket closes; ping, and close a silent peer.
        ``authorization`` is the upgrade request's ``Authorization`` header."""
        settings = self.settings
        log.info("agent socket opened: session %s from %s", session.session_id,
                 session.remote_addr, extra={"session_id": session.session_id})
        next_ping = time.monotonic() + settings.ping_interval_s
        grace = settings.close_grace_s
        results = SerialLanes(spawn_thread, name="agent result", limit=settings.results_at_once)
        try:
            while True:
                deadline = min(next_ping, session.last_activity + settings.idle_timeout_s)
                message = session.receive(timeout=max(0.0, deadline - time.monotonic()))
                if session.closed_by_relay:
                    break
                now = time.monotonic()
                if message is not None:
                    self._dispatch(session, message, results, authorization)
                elif now - session.last_activity >= settings.idle_timeout_s:
                    log.info("agent socket idle for %.1f s, closing: session %s machine %s",
                             now - session.last_activity, session.session_id, session.machine_id,
                             extra=_ids(session))
                    session.close("idle timeout", CloseReason.POLICY_VIOLATION)
                    grace = 0.0
                    break
                if now >= next_ping:
                    session.ping()
                    next_ping = now + settings.ping_interval_s
        except ConnectionClosed:
            pass
        finally:
            session.close()
            if not results.wait_idle(settings.results_drain_s):
                log.warning("agent socket closed with %d results still being handled: session %s machine %s",
                            results.running(), session.session_id, session.machine_id, extra=_ids(session))
            self._call(self._handler.on_disconnect, session)
            session.release(grace)
            log.info("agent socket closed: session %s machine %s", session.session_id,
                     session.machine_id, extra=_ids(session))

    def _dispatch(self, session: AgentSession, message: Message, results: SerialLanes,
                  authorization: Optional[str] = None) -> None:
        frame = _parse_frame(message)
        if frame is None:
            log.warning("invalid ws payload: session %s machine %s", session.session_id,
                        session.machine_id, extra=_ids(session))
            return
        kind = frame.get("type")
        if kind == "agent.hello":
            frame = self._admit_hello(session, frame, authorization)
        elif kind == "agent.result":
            frame = _checked_result(session, frame)
        route = self._routes.get(kind) if isinstance(kind, str) and frame is not None else None
        if route is None:
            return
        command_id = _command_id(frame) if kind == "agent.result" else None
        if command_id:
            results.submit(command_id, lambda: self._call(route, session, frame))
        else:
            self._call(route, session, frame)

    def _admit_hello(self, session: AgentSession, frame: dict[str, Any],
                     authorization: Optional[str]) -> Optional[dict[str, Any]]:
        """The hello without its token, or ``None`` when it is refused (an invalid machine id is
        ignored like a missing one; a bad token closes the socket with 4401)."""
        machine_id = frame.get("machineId")
        if machine_id is not None and not valid_id(machine_id):
            log.warning("agent hello with an invalid machineId ignored: session %s", session.session_id,
                        extra={"event": "agent_hello_invalid", "session_id": session.session_id})
            return None
        if isinstance(machine_id, str) and not self._auth.allows(machine_id, frame, authorization):
            log.warning("agent hello refused: no valid token for machine %s (session %s)", machine_id,
                        session.session_id, extra={"event": "agent_auth_failed", "session_id": session.session_id,
                                                   "machine_id": machine_id})
            session.close("unauthorized", CLOSE_UNAUTHORIZED)
            return None
        return {k: v for k, v in frame.items() if k != "token"}

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        """Run one handler call inside its own frame scope; log and drop what it raises."""
        try:
            with self._frame_scope(), self.registry.holding():
                method(*args)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not end the socket
            session = args[0]
            name = getattr(method, "__name__", "handler")
            log.error("agent frame handler failed: %s raised %s at %s (session %s machine %s)",
                      name, type(exc).__name__, _raise_site(exc), session.session_id,
                      session.machine_id, extra=_ids(session))


def register_agent_channel(
    app: Flask,
    registry: SessionRegistry,
    handler: AgentEventHandler,
    *,
    frame_scope: FrameScope,
    auth: Optional[AgentAuth] = None,
    ping_interval_s: float,
    max_message_bytes: int,
    idle_timeout_s: float,
    send_timeout_s: float = 10.0,
    close_grace_s: float = 2.0,
    max_connections: Optional[int] = None,
    results_at_once: int = ChannelSettings.results_at_once,
    results_drain_s: float = ChannelSettings.results_drain_s,
) -> AgentChannel:
    """Add the ``/agent`` route to ``app`` and return its channel (also in
    ``app.extensions["relay.agent_channel"]``)."""
    settings = ChannelSettings(
        ping_interval_s=ping_interval_s,
        idle_timeout_s=idle_timeout_s,
        max_message_bytes=max_message_bytes,
        send_timeout_s=send_timeout_s,
        close_grace_s=close_grace_s,
        max_connections=max_connections,
        results_at_once=results_at_once,
        results_drain_s=results_drain_s,
    )
    channel = AgentChannel(registry, handler, frame_scope, settings, auth)
    # Werkzeug routes upgrade requests only to rules marked ``websocket``: one rule for them, one
    # for every plain method (answered with the reference's 404).
    app.add_url_rule(AGENT_PATH, endpoint="agent_channel", view_func=channel.endpoint,
                     methods=["GET"], websocket=True)
    app.add_url_rule(AGENT_PATH, endpoint="agent_channel_http", view_func=channel.endpoint,
                     methods=_ALL_METHODS, provide_automatic_options=False)
    app.extensions[EXTENSION_KEY] = channel
    return channel


class _UpgradedResponse(Response):
    """Returned once the socket has ended: tells the WSGI server the connection is not HTTP any more."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self._mode = mode

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        if self._mode == "gunicorn":
            # gunicorn's workers treat StopIteration as "close the connection, write nothing".
            raise StopIteration()
        if self._mode == "werkzeug":
            return super().__call__(environ, start_response)
        return []


def _command_id(frame: dict[str, Any]) -> Optional[str]:
    """The result frame's command id when it is a non-empty string."""
    result = frame.get("result")
    command_id = result.get("commandId") if isinstance(result, dict) else None
    return command_id if isinstance(command_id, str) and command_id else None


def _checked_result(session: AgentSession, frame: dict[str, Any]) -> Optional[dict[str, Any]]:
    """A result frame whose command id, if it is a string, is a valid id; else ``None``."""
    command_id = _command_id(frame)
    if command_id is not None and not valid_id(command_id):
        log.warning("agent result with an invalid commandId ignored: session %s machine %s", session.session_id,
                    session.machine_id, extra={"event": "agent_result_invalid", **_ids(session)})
        return None
    return frame


def _ids(session: AgentSession) -> dict[str, Any]:
    return {"session_id": session.session_id, "machine_id": session.machine_id}


def _raw_target(environ: dict[str, Any]) -> str:
    """The request target as sent (path and query), as Fastify matches and reports it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    query = environ.get("QUERY_STRING", "")
    path = environ.get("PATH_INFO", "")
    return f"{path}?{query}" if query else path


def _asks_for_websocket(environ: dict[str, Any]) -> bool:
    return "websocket" in environ.get("HTTP_UPGRADE", "").lower()


def _fastify_error(status: int, message: str) -> Response:
    names = {400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
    body = {"message": message, "error": names[status], "statusCode": status}
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status=status,
        content_type="application/json; charset=utf-8",
    )


def _parse_frame(message: Message) -> Optional[dict[str, Any]]:
    """A JSON object, or ``None``. Binary frames are read as UTF-8 like Node's ``Buffer.toString()``."""
    text = message.decode("utf-8", errors="replace") if isinstance(message, bytes) else message
    try:
        frame = parse_strict(text)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


def _raise_site(exc: BaseException) -> str:
    """Where ``exc`` was raised (file:line function), without its message, which may quote the frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} {last.name}"
