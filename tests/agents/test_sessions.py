"""AgentSession over the relay's simple-websocket server (on a socketpair), and SessionRegistry."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from simple_websocket import ConnectionClosed, Server
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, Request, TextMessage

from relay.agents.frames import AgentServer
from relay.agents.sessions import MAX_BUFFERED_FRAMES, AgentSession, SessionRegistry, TrackedSocket, _text_frame
from tests.support.helpers import race
from tests.support.live_relay import PROJECT_ROOT


class AgentEnd:
    """The agent side of the pair: a wsproto client that has completed the handshake."""

    def __init__(self, sock: socket.socket, ws: WSConnection) -> None:
        self.sock = sock
        self.ws = ws

    def send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def events(self, timeout_s: float = 2.0, until: Optional[type] = None) -> list[Event]:
        """Read until ``until`` arrives (or the timeout ends, or the socket closes)."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            self.ws.receive_data(data)
            seen.extend(self.ws.events())
            if until is not None and any(isinstance(e, until) for e in seen):
                break
        return seen

    def texts(self, count: int, timeout_s: float = 5.0) -> list[str]:
        """Whole text messages (wsproto hands over a message in pieces as its bytes arrive)."""
        texts: list[str] = []
        partial = ""
        deadline = time.monotonic() + timeout_s
        while len(texts) < count and time.monotonic() < deadline:
            for event in self.events(0.2):
                if isinstance(event, TextMessage):
                    partial += event.data
                    if event.message_finished:
                        texts.append(partial)
                        partial = ""
        return texts


@pytest.fixture
def pair() -> Iterator[tuple[AgentSession, AgentEnd, Server]]:
    session, agent, server = open_pair()
    yield session, agent, server
    session.close()
    session.release(0.0)
    agent.sock.close()


def open_pair(
    send_timeout_s: float = 5.0, small_buffers: bool = False, max_message_bytes: int = 1 << 20
) -> tuple[AgentSession, AgentEnd, Server]:
    relay_sock, agent_sock = socket.socketpair()
    if small_buffers:
        relay_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        agent_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="relay.test", target="/agent"))
    environ: dict[str, Any] = {}
    for line in request.decode().split("\r\n")[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
    tracked = TrackedSocket(relay_sock, send_timeout_s=send_timeout_s)
    environ["gunicorn.socket"] = tracked
    server = AgentServer(environ, max_message_size=max_message_bytes)
    agent = AgentEnd(agent_sock, client)
    assert any(isinstance(e, AcceptConnection) for e in agent.events(until=AcceptConnection))
    return AgentSession(server, tracked), agent, server


def wait_until(condition: Any, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- AgentSession ---------------------------------------------------------------------------------
def test_new_session_has_a_uuid4_and_no_machine(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, _, _ = pair
    assert len(session.session_id) == 36 and session.session_id[14] == "4"
    assert session.machine_id is None
    assert session.connected_at <= time.time()
    assert not session.closed


def test_send_json_delivers_compact_json_with_raw_unicode(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair
    frame = {"type": "command", "command": {"commandId": "c1", "prompt": "修复登录"}}

    assert session.send_json(frame) is True

    assert agent.texts(1) == ['{"type":"command","command":{"commandId":"c1","prompt":"修复登录"}}']


def test_send_json_escapes_lone_surrogates_instead_of_failing(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair
    frame = {"type": "relay.trace", "trace": {"detail": "bad \ud800 text", "note": "开发"}}

    assert session.send_json(frame) is True

    assert [json.loads(t) for t in agent.texts(1)] == [frame]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_frames_of_every_length_class_are_wsprotos_own_bytes_and_arrive_whole(
    pair: tuple[AgentSession, AgentEnd, Server], size: int
) -> None:
    session, agent, server = pair
    frame = {"type": "relay.trace", "trace": {"detail": "x" * size}}
    text = json.dumps(frame, separators=(",", ":"))
    reference = WSConnection(ConnectionType.SERVER)
    reference.receive_data(WSConnection(ConnectionType.CLIENT).send(Request(host="relay", target="/agent")))
    list(reference.events())
    reference.send(AcceptConnection())

    assert _text_frame(text.encode()) == reference.send(TextMessage(data=text))
    assert session.send_json(frame) is True
    assert agent.texts(1) == [text]


def test_close_is_idempotent_and_later_sends_return_false(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair

    session.close("replaced by a newer connection")
    session.close("again")

    seen = agent.events(until=CloseConnection) + agent.events(0.2)
    closes = [e for e in seen if isinstance(e, CloseConnection)]
    assert [(c.code, c.reason) for c in closes] == [(1000, "replaced by a newer connection")]
    assert session.closed and session.closed_by_relay
    assert session.send_json({"type": "command"}) is False
    assert session.ping() is False


def test_send_json_returns_false_once_the_peer_closed(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair

    agent.send(CloseConnection(code=1000))

    assert wait_until(lambda: session.closed)
    assert not session.closed_by_relay
    assert session.send_json({"type": "command"}) is False
    with pytest.raises(ConnectionClosed):
        session.receive(timeout=1.0)


def test_held_frames_go_out_in_order_with_the_next_frame_and_at_the_end_of_the_block(
    pair: tuple[AgentSession, AgentEnd, Server]
) -> None:
    session, agent, server = pair
    registry = SessionRegistry()
    registry.attach("m1", session)
    writes: list[bytes] = []
    server.sock._sock = WriteCounter(server.sock._sock, writes)

    with registry.holding():
        assert registry.send("m1", {"n": 1}, hold=True)
        assert writes == []
        assert registry.send("m1", {"n": 2})  # not held: goes out at once, after frame 1
        assert len(writes) == 1
        assert registry.send("m1", {"n": 3}, hold=True) and registry.send("m1", {"n": 4}, hold=True)
        assert len(writes) == 1
    assert len(writes) == 2

    assert [json.loads(t)["n"] for t in agent.texts(4)] == [1, 2, 3, 4]
    assert registry.send("m1", {"n": 5}, hold=True)  # outside a block: at once
    assert len(writes) == 3 and [json.loads(t)["n"] for t in agent.texts(1)] == [5]


def test_without_gevent_a_lingering_block_writes_what_it_held_when_it_ends(
    pair: tuple[AgentSession, AgentEnd, Server]
) -> None:
    session, agent, server = pair
    writes: list[bytes] = []
    server.sock._sock = WriteCounter(server.sock._sock, writes)
    with SessionRegistry().holding(linger=True):
        assert session.hold_json({"n": 1})
        assert writes == []
    assert len(writes) == 1
    assert [json.loads(t)["n"] for t in agent.texts(1)] == [1]


GEVENT_LINGER = """
from gevent import monkey; monkey.patch_all()
import gevent, json
from relay.agents.sessions import HELD_LINGER_S, SessionRegistry
from tests.agents.test_sessions import open_pair

class Counted:
    def __init__(self, sock, writes):
        self._sock, self._writes = sock, writes
    def send(self, data, *args):
        self._writes.append(bytes(data))
        return self._sock.send(data, *args)
    def sendall(self, data, *args):
        self._writes.append(bytes(data))
        return self._sock.sendall(data, *args)
    def __getattr__(self, name):
        return getattr(self._sock, name)

report = {}
session, agent, server = open_pair()
writes = []
server.sock._sock = Counted(server.sock._sock, writes)
registry = SessionRegistry()
registry.attach("m1", session)
reader = gevent.spawn(agent.texts, 4, 10.0)
with registry.holding(linger=True):
    registry.send("m1", {"n": 1}, hold=True)
report["after_block"] = len(writes)
registry.send("m1", {"n": 2})  # no yield since the block: the linger's timer cannot have run
report["with_next"] = len(writes)
with registry.holding(linger=True):
    registry.send("m1", {"n": 3}, hold=True)
gevent.sleep(HELD_LINGER_S * 10)
report["after_linger"] = len(writes)
with registry.holding(linger=True):
    registry.send("m1", {"n": 4}, hold=True)
session.close("bye")
report["texts"] = [json.loads(t)["n"] for t in reader.get(timeout=10)]
report["writes"] = len(writes)
print(json.dumps(report))
session.release(0.0)
agent.sock.close()
"""


def test_under_gevent_a_lingering_block_leaves_its_frames_to_the_next_write_for_a_moment() -> None:
    """What a request held goes out with the socket's next frame within ``HELD_LINGER_S``, alone
    once that has passed, and with the close frame when the socket closes first."""
    done = subprocess.run([sys.executable, "-c", GEVENT_LINGER], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["after_block"] == 0
    assert report["with_next"] == 1
    assert report["after_linger"] == 2
    assert report["texts"] == [1, 2, 3, 4]
    assert report["writes"] == 3


def test_an_inner_block_sends_what_it_held_when_it_ends(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair
    registry = SessionRegistry()
    with registry.holding():  # the request that opened the socket lasts as long as the socket
        with registry.holding():  # one agent frame
            assert session.hold_json({"n": 1})
        assert [json.loads(t)["n"] for t in agent.texts(1)] == [1]


def test_frames_held_for_a_socket_that_closes_are_dropped(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, _, _ = pair
    with SessionRegistry().holding():
        assert session.hold_json({"n": 1})
        session.close()
        assert session.hold_json({"n": 2}) is False
    assert session.flush_held() is False


def test_holding_a_frame_does_not_wait_for_a_write_in_progress(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, server = pair
    order: list[str] = []
    writing, held = threading.Event(), threading.Event()

    def slow_write() -> None:
        with server.sock.lock:  # as a write to a slow agent holds it
            writing.set()
            held.wait(timeout=5)
            order.append("write done")

    writer = threading.Thread(target=slow_write)
    with SessionRegistry().holding():
        writer.start()
        assert writing.wait(timeout=5)
        assert session.hold_json({"n": 1})
        order.append("held")
        held.set()
        writer.join(timeout=5)
    assert order == ["held", "write done"]
    assert [json.loads(t)["n"] for t in agent.texts(1)] == [1]


class WriteCounter:
    """Wraps the relay end's socket and records each ``sendall``."""

    def __init__(self, sock: socket.socket, writes: list[bytes]) -> None:
        self._sock = sock
        self._writes = writes

    def sendall(self, data: bytes) -> None:
        self._writes.append(data)
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_send_json_returns_false_and_aborts_when_the_write_fails(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, _, server = pair
    server.sock._sock.shutdown(socket.SHUT_WR)  # the next write raises EPIPE while reads still work

    assert session.send_json({"type": "command"}) is False
    assert session.closed and session.closed_by_relay


def test_send_json_gives_up_after_the_send_timeout_when_the_peer_does_not_read() -> None:
    session, agent, _ = open_pair(send_timeout_s=0.3, small_buffers=True)
    big = {"type": "command", "pad": "x" * 65536}
    started = time.monotonic()
    try:
        results = []
        for _ in range(50):
            results.append(session.send_json(big))
            if not results[-1]:
                break
        assert results[-1] is False
        assert time.monotonic() - started < 5.0
        assert session.closed
    finally:
        session.release(0.0)
        agent.sock.close()


GEVENT_SEND_TIMEOUT = """
from gevent import monkey; monkey.patch_all()
import time
from tests.agents.test_sessions import open_pair
session, agent, _ = open_pair(send_timeout_s=0.3, small_buffers=True)
started = time.monotonic()
results = []
for _ in range(50):
    results.append(session.send_json({"type": "command", "pad": "x" * 65536}))
    if not results[-1]:
        break
print(results[-1], session.closed, round(time.monotonic() - started, 2))
"""


def test_the_send_timeout_also_holds_on_gevent_sockets() -> None:
    """Under gunicorn's gevent worker (the default) sockets are gevent's: run the case above there."""
    done = subprocess.run([sys.executable, "-c", GEVENT_SEND_TIMEOUT], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    gave_up, closed, seconds = done.stdout.split()
    assert (gave_up, closed) == ("False", "True")
    assert float(seconds) < 5.0


GEVENT_SEND_PATHS = """
from gevent import monkey; monkey.patch_all()
import gevent, json, socket
from tests.agents.test_sessions import open_pair
calls = []
original = socket.socket.sendall
def counting_sendall(self, data, *args):
    calls.append(len(data))
    return original(self, data, *args)
socket.socket.sendall = counting_sendall
session, agent, _ = open_pair(small_buffers=True)
reader = gevent.spawn(agent.texts, 3, 20.0)
small = session.send_json({"n": 1})
after_small = len(calls)
big = session.send_json({"n": 2, "pad": "x" * 200000}) and session.send_json({"n": 3})
texts = reader.get(timeout=20)
print(json.dumps({"sent": [small, big], "sendall_after_small": after_small, "sendall_after_big": len(calls),
                  "frames": [(json.loads(t)["n"], len(t)) for t in texts]}))
session.close()
session.release(0.0)
agent.sock.close()
"""


def test_gevent_sockets_write_a_fitting_frame_in_one_attempt_and_the_rest_under_the_deadline() -> None:
    """A frame that fits the socket buffer skips gevent's ``sendall``; a larger one continues there."""
    done = subprocess.run([sys.executable, "-c", GEVENT_SEND_PATHS], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sent"] == [True, True]
    assert report["sendall_after_small"] == 0
    assert report["sendall_after_big"] >= 1
    assert [n for n, _ in report["frames"]] == [1, 2, 3]
    assert report["frames"][1][1] == len(json.dumps({"n": 2, "pad": "x" * 200000}, separators=(",", ":")))


def test_concurrent_sends_arrive_whole_and_in_per_thread_order() -> None:
    # frames far larger than the socket buffers: each write takes many send() calls, which would
    # interleave between threads without the per-socket lock
    session, agent, _ = open_pair(small_buffers=True)
    threads, per_thread = 8, 12
    texts: list[str] = []
    reader = threading.Thread(target=lambda: texts.extend(agent.texts(threads * per_thread, 20.0)))
    reader.start()

    def send_many(index: int) -> bool:
        return all(session.send_json({"t": index, "n": n, "pad": "p" * 65536}) for n in range(per_thread))

    try:
        assert all(race(threads, send_many))
        reader.join(25)
    finally:
        session.close()
        session.release(0.0)
        agent.sock.close()

    frames = [json.loads(t) for t in texts]
    assert len(frames) == threads * per_thread
    for index in range(threads):
        assert [f["n"] for f in frames if f["t"] == index] == list(range(per_thread))


def test_last_seen_moves_with_any_bytes_received_including_pings(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair
    before_wall, before_mono = session.last_seen, session.last_activity
    time.sleep(0.05)

    agent.send(Ping(payload=b"x"))

    assert wait_until(lambda: session.last_activity > before_mono)
    assert session.last_seen > before_wall
    assert session.receive(timeout=0.1) is None  # a ping is not a frame for the handler


def test_ping_reaches_the_peer(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair

    assert session.ping() is True

    assert any(isinstance(e, Ping) for e in agent.events(until=Ping))


def test_reader_stops_reading_while_the_handler_is_behind(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, server = pair
    count = 300

    def send_all() -> None:
        for n in range(count):
            agent.send(TextMessage(data=json.dumps({"n": n, "pad": "q" * 1000})))

    sender = threading.Thread(target=send_all)
    sender.start()
    time.sleep(0.5)

    # one 4 KiB read may complete a few more frames after the limit is reached
    assert MAX_BUFFERED_FRAMES <= len(server.input_buffer) <= MAX_BUFFERED_FRAMES + 5

    received = [session.receive(timeout=2.0) for _ in range(count)]
    sender.join(5)
    assert [json.loads(m)["n"] for m in received if m is not None] == list(range(count))


def test_release_cuts_the_socket_when_the_peer_never_answers_the_close(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, _, server = pair
    session.close("idle timeout", 1008)
    assert server.thread.is_alive()  # still waiting for the agent's close frame

    started = time.monotonic()
    session.release(0.2)

    assert not server.thread.is_alive()
    assert time.monotonic() - started < 1.5


def test_close_reason_is_clipped_to_123_bytes(pair: tuple[AgentSession, AgentEnd, Server]) -> None:
    session, agent, _ = pair

    session.close("关" * 100)

    closes = [e for e in agent.events(1.0) if isinstance(e, CloseConnection)]
    assert len(closes) == 1 and closes[0].reason == "关" * 41


# -- SessionRegistry ------------------------------------------------------------------------------
@dataclass(eq=False)
class FakeConnection:
    session_id: str
    machine_id: Optional[str] = None
    closed: bool = False
    close_reasons: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)

    def send_json(self, frame: dict[str, Any]) -> bool:
        if self.closed:
            return False
        self.sent.append(frame)
        return True

    def close(self, reason: str = "") -> None:
        self.close_reasons.append(reason)
        self.closed = True


def test_attach_registers_and_sets_the_machine_id() -> None:
    registry = SessionRegistry()
    conn = FakeConnection("s1")

    assert registry.attach("m1", conn) is None

    assert conn.machine_id == "m1"
    assert registry.get("m1") is conn
    assert registry.machine_ids() == ["m1"] and registry.count() == 1
    assert registry.sessions() == [conn]


def test_newer_hello_replaces_and_closes_the_older_session() -> None:
    registry = SessionRegistry()
    old, new = FakeConnection("old"), FakeConnection("new")
    registry.attach("m1", old)

    assert registry.attach("m1", new) is old

    assert old.closed and old.close_reasons == ["replaced by a newer connection"]
    assert not new.closed
    assert registry.get("m1") is new


def test_hello_again_on_the_same_session_replaces_nothing() -> None:
    registry = SessionRegistry()
    conn = FakeConnection("s1")
    registry.attach("m1", conn)

    assert registry.attach("m1", conn) is None
    assert not conn.closed and registry.count() == 1


def test_detach_by_an_old_session_id_keeps_the_newer_session() -> None:
    registry = SessionRegistry()
    old, new = FakeConnection("old"), FakeConnection("new")
    registry.attach("m1", old)
    registry.attach("m1", new)

    assert registry.detach("m1", "old") is False
    assert registry.get("m1") is new
    assert registry.detach("m1", "new") is True
    assert registry.get("m1") is None and registry.count() == 0
    assert registry.detach("m1", "new") is False


def test_hello_with_another_machine_id_moves_the_session_without_a_leak() -> None:
    registry = SessionRegistry()
    conn = FakeConnection("s1")
    registry.attach("a", conn)

    assert registry.attach("b", conn) is None

    assert registry.machine_ids() == ["b"]
    assert conn.machine_id == "b" and not conn.closed


def test_moving_away_leaves_a_newer_owner_of_the_old_id_alone() -> None:
    registry = SessionRegistry()
    first, second = FakeConnection("first"), FakeConnection("second")
    registry.attach("a", first)
    registry.attach("a", second)  # first is replaced (and closed) under "a"
    first.closed = False  # pretend it is still open and says hello as "b"

    registry.attach("b", first)

    assert registry.get("a") is second and registry.get("b") is first


def test_a_closed_session_is_not_attached() -> None:
    registry = SessionRegistry()
    conn = FakeConnection("s1", closed=True)

    assert registry.attach("m1", conn) is None
    assert registry.get("m1") is None and conn.machine_id is None


def test_send_goes_to_the_machine_socket_or_returns_false() -> None:
    registry = SessionRegistry()
    conn = FakeConnection("s1")
    registry.attach("m1", conn)

    assert registry.send("m1", {"type": "command"}) is True
    assert conn.sent == [{"type": "command"}]
    assert registry.send("nobody", {"type": "command"}) is False
    conn.closed = True
    assert registry.send("m1", {"type": "command"}) is False


def test_racing_hellos_for_one_machine_leave_exactly_one_open_session() -> None:
    registry = SessionRegistry()
    conns = [FakeConnection(f"s{i}") for i in range(16)]

    race(16, lambda i: registry.attach("m1", conns[i]))

    winner = registry.get("m1")
    assert isinstance(winner, FakeConnection) and not winner.closed
    assert sum(1 for c in conns if not c.closed) == 1
    assert registry.count() == 1
