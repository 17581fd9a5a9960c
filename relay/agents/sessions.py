"""Agent sockets (``AgentSession``) and the process-local map machineId → socket (``SessionRegistry``).

A session wraps one simple-websocket ``Server``. Its raw socket is replaced by a ``TrackedSocket``
before the server is built, so that every write (frames sent by any thread, pings, and the pongs and
close replies of simple-websocket's reader thread) happens whole under one lock per socket with a
send timeout, every read stamps the socket's activity for the idle check, and the reader stops
reading while the handler thread is behind (TCP then slows the agent down).
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Optional, Union

from simple_websocket import ConnectionClosed, Server
from wsproto.connection import ConnectionState
from wsproto.events import Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from relay.agents.protocol import AgentConnection
from relay.jsontext import compact_ascii, compact_bytes
from relay.locks import compute_lock, gevent_patched, spawn_thread

log = logging.getLogger("relay.agents")

#: Sessions with frames held by the running ``SessionRegistry.holding`` block, by session id.
_holding: ContextVar[Optional[dict[str, "AgentSession"]]] = ContextVar("agent_frames_held", default=None)
#: Frames received but not yet handled; beyond this the reader stops reading from the socket.
MAX_BUFFERED_FRAMES = 32
#: How long frames held by a request (its trace frames after the command) may wait for the socket's
#: next write under gevent (``SessionRegistry.holding(linger=True)``).
HELD_LINGER_S = 0.01
#: RFC 6455: the reason in a close frame is at most 123 bytes of UTF-8.
_MAX_CLOSE_REASON_BYTES = 123
#: A server frame's first two bytes, then a 16-bit or 64-bit payload length (RFC 6455, 5.2).
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")

Message = Union[str, bytes]


class TrackedSocket:
    """The client socket as simple-websocket uses it (``send``, ``recv``, ``close``, ``fileno``)."""

    def __init__(self, sock: socket.socket, *, send_timeout_s: Optional[float]) -> None:
        self._sock = sock
        #: Held for every write, so frames from several threads never interleave.
        self.lock = threading.RLock()
        #: ``time.monotonic()`` / ``time.time()`` of the last bytes received.
        self.last_activity = time.monotonic()
        self.last_seen = time.time()
        self._room = threading.Condition()
        self._backlog: Callable[[], int] = lambda: 0
        self._stopping = False
        #: The reader waits in ``_wait_for_room``: only then does ``consumed`` notify.
        self._reader_paused = False
        #: Encoded frames waiting for the next write (``AgentSession.hold_json``), and the lock of that
        #: list alone: holding a frame never waits for a write in progress.
        self._held: list[bytes] = []
        self._held_lock = compute_lock()
        #: Under gunicorn's gevent worker the socket is gevent's, non-blocking underneath, so
        #: ``SO_SNDTIMEO`` would never fire: the send deadline is a gevent timeout instead.
        self._send_deadline: Optional[Callable[[], Any]] = None
        if send_timeout_s and type(sock).__module__.split(".")[0] == "gevent":
            import gevent

            self._send_deadline = lambda: gevent.Timeout(send_timeout_s, TimeoutError("agent send timed out"))
        elif send_timeout_s:
            seconds = int(send_timeout_s)
            micros = int((send_timeout_s - seconds) * 1_000_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))

    def limit_backlog(self, backlog: Callable[[], int]) -> None:
        """Pause reading while ``backlog()`` (frames waiting for the handler) is at the limit."""
        self._backlog = backlog

    def consumed(self) -> None:
        """The handler thread took a frame: wake the reader if it is paused."""
        if self._reader_paused:
            with self._room:
                self._room.notify_all()

    def send(self, data: bytes) -> int:
        """Write all of ``data``, after any held frames, or raise ``OSError`` (including the send
        timeout). What simple-websocket calls; the sessions, which hold ``lock`` already, call
        ``send_locked``."""
        with self.lock:
            return self.send_locked(data)

    def send_locked(self, data: bytes) -> int:
        """``send``, by a caller that holds ``lock``."""
        if self._held:
            with self._held_lock:
                held, self._held = self._held, []
            data = b"".join([*held, data])
        if self._send_deadline is None:
            self._sock.sendall(data)
        else:
            self._send_gevent(data)
        return len(data)

    def _send_gevent(self, data: bytes) -> None:
        """One attempt that never waits, then what is left under the send deadline. An agent's frames
        nearly always fit in the socket buffer, and the attempt spares gevent's ``sendall`` (which
        asks the kernel for the buffer size on every call) and a timer per frame."""
        try:
            sent = self._sock.send(data, 0, 0.0)  # gevent's socket: timeout 0.0 returns instead of waiting
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            assert self._send_deadline is not None
            with self._send_deadline():
                self._sock.sendall(memoryview(data)[sent:])

    def hold(self, data: bytes) -> None:
        """Keep an encoded frame for the next write."""
        with self._held_lock:
            self._held.append(data)

    def flush_locked(self) -> None:
        """Write the held frames, if any; raise ``OSError`` like ``send`` (the caller holds ``lock``)."""
        if self._held:
            self.send_locked(b"")

    def has_held(self) -> bool:
        return bool(self._held)

    def drop_held(self) -> None:
        """Forget the held frames."""
        with self._held_lock:
            self._held.clear()

    def recv(self, bufsize: int) -> bytes:
        if not self._stopping and self._backlog() >= MAX_BUFFERED_FRAMES:
            self._wait_for_room()
        data = self._sock.recv(bufsize)
        if data:
            self.last_activity = time.monotonic()
            self.last_seen = time.time()
        return data

    def _wait_for_room(self) -> None:
        """Pause the reader until the handler has taken a frame or the socket stops. The pause is
        marked before the backlog is looked at again, so a ``consumed`` that comes after that look
        sees the mark and wakes the reader; one that comes before it left room the look sees."""
        with self._room:
            self._reader_paused = True
            try:
                self._room.wait_for(lambda: self._stopping or self._backlog() < MAX_BUFFERED_FRAMES)
            finally:
                self._reader_paused = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def shutdown(self) -> None:
        """Cut both directions: a reader blocked in ``recv`` returns at once."""
        self._stop_waiting()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Called by simple-websocket's reader thread when it ends. Only shuts the socket down:
        the WSGI server closes the descriptor itself after the view returns (gunicorn's gthread
        worker counts a connection twice as closed if the socket is already closed by then)."""
        self.shutdown()

    def _stop_waiting(self) -> None:
        with self._room:
            self._stopping = True
            self._room.notify_all()


class AgentSession:
    """One agent WebSocket (implements ``AgentConnection``)."""

    def __init__(self, server: Server, sock: TrackedSocket, *, remote_addr: Optional[str] = None) -> None:
        self.session_id: str = str(uuid.uuid4())
        #: Set by ``SessionRegistry.attach`` (the first hello).
        self.machine_id: Optional[str] = None
        #: Epoch seconds.
        self.connected_at: float = time.time()
        self.remote_addr = remote_addr
        self._server = server
        self._sock = sock
        self._closed = False
        sock.limit_backlog(lambda: len(server.input_buffer))
        #: The event loop whose timer ends a linger (``flush_held_soon``); ``None`` without gevent.
        self._loop: Any = None
        if gevent_patched():
            import gevent

            self._loop = gevent.get_hub().loop
        self._linger: Any = None

    def __repr__(self) -> str:
        return f"AgentSession({self.session_id}, machine={self.machine_id!r}, closed={self.closed})"

    @property
    def last_seen(self) -> float:
        """Epoch seconds of the last bytes received (frames, pongs)."""
        return self._sock.last_seen

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` of the last bytes received."""
        return self._sock.last_activity

    @property
    def closed(self) -> bool:
        """Closed by either side (or closing): nothing more can be sent."""
        return self._closed or not self._server.connected

    @property
    def closed_by_relay(self) -> bool:
        """``close`` or ``abort`` was called: frames still buffered are not handled."""
        return self._closed

    def send_json(self, frame: dict[str, Any]) -> bool:
        """Send ``frame`` as one JSON text frame; ``False`` if the socket is closed/closing or the
        write failed (a failed write aborts the socket: the stream may hold half a frame)."""
        data = _text_frame(_json_payload(frame))
        with self._sock.lock:
            if not self._open():
                return False
            try:
                self._sock.send_locked(data)
                return True
            except OSError as exc:
                error = exc
        return self._write_failed(error)

    def hold_json(self, frame: dict[str, Any]) -> bool:
        """Inside ``SessionRegistry.holding``: encode ``frame`` now (so frames keep their order) and
        write it with this socket's next write, or when the block ends. Elsewhere: ``send_json``.
        ``False`` when the socket is closed or closing."""
        held = _holding.get()
        if held is None:
            return self.send_json(frame)
        if not self._open():
            return False
        self._sock.hold(_text_frame(_json_payload(frame)))
        held[self.session_id] = self
        return True

    def _open(self) -> bool:
        """Frames may be sent: neither side has closed or begun closing. Writers ask under the
        socket's lock; ``hold_json`` asks without it, and a frame it holds for a socket that closes
        meanwhile is dropped with the other held frames (``flush_held``)."""
        return not self.closed and self._server.ws.state is ConnectionState.OPEN

    def flush_held(self) -> bool:
        """Write the frames ``hold_json`` kept; ``False`` (and the socket aborted) if that fails."""
        with self._sock.lock:
            if self.closed:
                self._sock.drop_held()
                return False
            try:
                self._sock.flush_locked()
                return True
            except OSError as exc:
                error = exc
        return self._write_failed(error)

    def flush_held_soon(self) -> None:
        """``flush_held`` after ``HELD_LINGER_S`` under gevent, at once elsewhere. A write to the
        socket meanwhile takes the held frames along: after a callback's command, the agent's
        result usually comes back within the linger, and the callback's last traces go out with the
        result's (one write per callback fewer)."""
        if self._loop is None:
            self.flush_held()
            return
        if self._linger is None:
            self._linger = self._loop.timer(HELD_LINGER_S)
            self._linger.start(self._linger_over)

    def _linger_over(self) -> None:
        """In the event loop, which must not wait: a greenlet writes what is still held."""
        timer, self._linger = self._linger, None
        timer.close()
        if self._sock.has_held():
            spawn_thread(self.flush_held)

    def _write_failed(self, error: OSError) -> bool:
        """A failed write aborts the socket (the stream may hold half a frame); always ``False``."""
        log.warning("agent send failed: %s (session %s machine %s)", type(error).__name__,
                    self.session_id, self.machine_id,
                    extra={"session_id": self.session_id, "machine_id": self.machine_id})
        self.abort()
        return False

    def ping(self) -> bool:
        with self._sock.lock:
            if self.closed:
                return False
            try:
                self._sock.send_locked(self._server.ws.send(Ping()))
                return True
            except LocalProtocolError:
                return False
            except OSError:
                pass
        self.abort()
        return False

    def receive(self, timeout: float) -> Optional[Message]:
        """The next frame (``str`` or ``bytes``), or ``None`` after ``timeout`` seconds.

        Raises ``simple_websocket.ConnectionClosed`` once the socket is closed and drained.
        """
        message: Optional[Message] = self._server.receive(timeout=timeout)
        if message is not None:
            self._sock.consumed()
        return message

    def close(self, reason: str = "", code: int = CloseReason.NORMAL_CLOSURE) -> None:
        """Send a close frame (idempotent). The reader thread ends when the peer answers, or when
        ``release`` cuts the socket."""
        with self._sock.lock:
            if self._closed:
                return
            self._closed = True
            sent = False
            if self._server.connected:
                try:
                    self._server.close(reason=code, message=_clip_reason(reason))
                    sent = True
                except (ConnectionClosed, LocalProtocolError, OSError):
                    pass
            self._server.connected = False
        if not sent:
            self._sock.shutdown()
        self._server.event.set()

    def abort(self) -> None:
        """Close without a close frame (the write side is broken or stuck)."""
        with self._sock.lock:
            self._closed = True
            self._server.connected = False
        self._sock.shutdown()
        self._server.event.set()

    def release(self, grace_s: float) -> None:
        """After close: give the peer ``grace_s`` to answer the close frame, then cut the socket
        so simple-websocket's reader thread ends even when the peer is gone."""
        reader: threading.Thread = self._server.thread
        reader.join(grace_s)
        if reader.is_alive():
            self._sock.shutdown()
            reader.join(1.0)


def _json_payload(frame: dict[str, Any]) -> bytes:
    """Compact JSON in UTF-8 with non-ASCII kept, like ``JSON.stringify``. Lone surrogates (an agent
    may send ``"\\ud800"``, and traces echo agent text) cannot be UTF-8 encoded, so such a frame is
    escaped."""
    try:
        return compact_bytes(frame)
    except UnicodeEncodeError:
        return compact_ascii(frame).encode("ascii")


def _text_frame(payload: bytes) -> bytes:
    """``payload`` as one unfragmented, unmasked text frame, as a server sends it (RFC 6455, 5.2).

    wsproto builds the same bytes (``tests/agents/test_sessions.py`` compares them) in some twenty
    times the time, and a callback sends several frames. No extension is ever in force: the
    handshake drops the client's offer (``AgentChannel._accept``).
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return _HEADER_16.pack(0x81, 126, size) + payload
    return _HEADER_64.pack(0x81, 127, size) + payload


def _clip_reason(reason: str) -> Optional[str]:
    data = reason.encode("utf-8")[:_MAX_CLOSE_REASON_BYTES]
    return data.decode("utf-8", errors="ignore") or None


class HeldFrames:
    """The context manager ``SessionRegistry.holding`` returns. A class rather than a generator:
    each callback enters two, and a generator-based context manager costs several times as much."""

    __slots__ = ("_held", "_token", "_linger")

    def __init__(self, linger: bool = False) -> None:
        self._linger = linger

    def __enter__(self) -> None:
        self._held: dict[str, AgentSession] = {}
        self._token = _holding.set(self._held)

    def __exit__(self, *exc: object) -> None:
        _holding.reset(self._token)
        for session in self._held.values():
            if self._linger:
                session.flush_held_soon()
            else:
                session.flush_held()


class SessionRegistry:
    """Process-local machineId → session map. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_machine: dict[str, AgentConnection] = {}

    def attach(self, machine_id: str, session: AgentConnection) -> Optional[AgentConnection]:
        """Register ``session`` for ``machine_id`` (a hello) and return the session it replaced.

        The replaced session is closed: the newest hello wins and the older socket does not linger.
        A session that said hello before under another id is first removed from that id. A session
        that is already closed is not registered (``None`` is returned).
        """
        if getattr(session, "closed", False):
            return None
        with self._lock:
            previous_id = session.machine_id
            if (
                previous_id is not None
                and previous_id != machine_id
                and self._by_machine.get(previous_id) is session
            ):
                del self._by_machine[previous_id]
            replaced = self._by_machine.get(machine_id)
            if replaced is session:
                replaced = None
            self._by_machine[machine_id] = session
            session.machine_id = machine_id
        if replaced is not None:
            replaced.close("replaced by a newer connection")
        return replaced

    def detach(self, machine_id: str, session_id: str) -> bool:
        """Remove ``machine_id`` only if it is still held by ``session_id``."""
        with self._lock:
            current = self._by_machine.get(machine_id)
            if current is None or current.session_id != session_id:
                return False
            del self._by_machine[machine_id]
            return True

    def get(self, machine_id: str) -> Optional[AgentConnection]:
        # One dict lookup is atomic; the lock serialises the changes, which read and then write.
        return self._by_machine.get(machine_id)

    def send(self, machine_id: str, frame: dict[str, Any], hold: bool = False) -> bool:
        """Send to the machine's socket; ``False`` if there is none or the send failed. With
        ``hold`` (informational frames such as traces), inside ``holding`` the frame goes out with
        the socket's next write or when the block ends."""
        session = self.get(machine_id)
        if session is None:
            return False
        if hold and isinstance(session, AgentSession):
            return session.hold_json(frame)
        return session.send_json(frame)

    def holding(self, linger: bool = False) -> HeldFrames:
        """Frames sent with ``hold`` inside the block (``with``) wait for the next frame to the same
        socket, or for the end of the block: one write instead of several. A callback's traces then
        go out with its command and once more at the end, instead of in four writes. An inner block
        sends what it held when it ends (each agent frame is one, inside the request that opened the
        socket). With ``linger`` (a request's block), what is still held at the end waits up to
        ``HELD_LINGER_S`` more for the socket's next write under gevent (``flush_held_soon``); the
        close frame, like any frame, takes held frames along."""
        return HeldFrames(linger)

    def machine_ids(self) -> list[str]:
        with self._lock:
            return list(self._by_machine)

    def count(self) -> int:
        with self._lock:
            return len(self._by_machine)

    def sessions(self) -> list[AgentConnection]:
        with self._lock:
            return list(self._by_machine.values())
