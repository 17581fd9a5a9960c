"""Scheduling under gunicorn's gevent worker (``config/gunicorn.py``)."""
from __future__ import annotations

import json
import socket
import time
from typing import Any, Optional

import pytest
import requests

from tests.support.live_relay import live_relay

PIPELINED = 20


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def _read_responses(sock: socket.socket, count: int) -> None:
    received = b""
    while received.count(b"HTTP/1.1 200") < count or not received.endswith(b"ok"):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        received += chunk


def test_a_connection_with_requests_waiting_does_not_keep_the_worker_from_the_others() -> None:
    """Client A pipelines 20 requests, the first of which keeps the worker busy for a second;
    meanwhile client B, already connected and served once, sends one. Without a yield between
    requests the worker serves all of A's, already in its buffer, before B's, and so it does with a
    yield that does not let the loop poll the sockets first (``gevent.sleep(0)``); with the
    yield of ``post_request``, B's comes within the first few."""
    with live_relay("tests.support.order_app:app") as relay:
        a = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        b = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        try:
            b.sendall(_request("/hit/b-connected"))
            _read_responses(b, 1)
            a.sendall(b"".join(_request(f"/busy/a{i}" if i == 0 else f"/hit/a{i}") for i in range(PIPELINED)))
            time.sleep(0.1)
            b.sendall(_request("/hit/b"))
            _read_responses(b, 1)
            _read_responses(a, PIPELINED)
        finally:
            a.close()
            b.close()
        order = json.loads(requests.get(relay.url("/order"), timeout=5).text)
    assert sorted(order) == sorted([f"a{i}" for i in range(PIPELINED)] + ["b-connected", "b"])
    assert order.index("b") <= 3, order


def test_a_keep_alive_connection_is_served_again_while_the_loop_is_never_idle() -> None:
    """The yield between a connection's requests must not wait for an idle loop, which a saturated
    worker may not have: while a greenlet keeps the loop busy, three more requests on the same
    connection are answered (``gevent.idle()`` held the second until the spinning stopped)."""
    with live_relay("tests.support.order_app:app") as relay:
        with requests.Session() as session:
            assert session.get(relay.url("/spin"), timeout=5).text == "ok"
            for i in range(3):
                assert session.get(relay.url(f"/hit/during-spin-{i}"), timeout=10).text == "ok"
            order = json.loads(session.get(relay.url("/order"), timeout=10).text)
    assert order == ["during-spin-0", "during-spin-1", "during-spin-2"]


def test_in_a_quiet_worker_the_next_request_on_a_connection_is_not_held_for_another_event() -> None:
    """The yield waits for the loop's next poll; in a worker with nothing else to do that poll must
    not block until some unrelated timer (gunicorn's, once a second), or each request on a
    keep-alive connection would take that long: ten took 10 s that way, against milliseconds."""
    with live_relay("tests.support.order_app:app") as relay:
        with requests.Session() as session:
            session.get(relay.url("/hit/first"), timeout=10)
            started = time.monotonic()
            for i in range(10):
                assert session.get(relay.url(f"/hit/next-{i}"), timeout=10).text == "ok"
            assert time.monotonic() - started < 5.0


def test_the_worker_reads_each_setting_once_as_a_plain_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.config import Config

    from config.gunicorn import settings_as_attributes

    cfg = Config()
    cfg.set("keepalive", 7)
    cfg.set("worker_class", "gevent")
    settings_as_attributes(cfg)
    monkeypatch.setattr(Config, "__getattr__", lambda self, name: pytest.fail(f"{name} read through __getattr__"))
    assert cfg.keepalive == 7
    assert cfg.limit_request_line == cfg.settings["limit_request_line"].get()
    assert cfg.post_request is cfg.settings["post_request"].get()
    assert cfg.worker_class_str == "gevent"  # a property of Config's own, still answered by it


def test_the_worker_moves_what_it_made_at_startup_out_of_the_collector_s_way(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    from types import SimpleNamespace

    from gunicorn.config import Config

    from config.gunicorn import post_worker_init

    from gunicorn.http import wsgi

    monkeypatch.setattr(wsgi, "Response", wsgi.Response)
    made_at_startup = {"app": ["extensions"]}
    before = gc.get_freeze_count()
    try:
        post_worker_init(SimpleNamespace(cfg=Config(), wsgi=object()))
        frozen = gc.get_freeze_count()
        tracked = gc.get_objects()
        assert frozen > before
        assert not any(o is made_at_startup for o in tracked)
        made_later = {"request": ["state"]}
        assert any(o is made_later for o in gc.get_objects())
    finally:
        gc.unfreeze()


# -- responses in one write -------------------------------------------------------------------------
class _Sent:
    """A client socket that keeps what each ``send``, ``sendall`` (and ``sendfile``) got; ``send`` takes
    at most ``room`` bytes, as a socket whose buffer is nearly full."""

    def __init__(self, room: Optional[int] = None) -> None:
        self.writes: list[bytes] = []
        self.calls: list[str] = []
        self.room = room

    def send(self, data: bytes) -> int:
        taken = bytes(data[:self.room])
        self.writes.append(taken)
        self.calls.append("send")
        return len(taken)

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.calls.append("sendall")

    def sendfile(self, file: Any, offset: int = 0, count: Optional[int] = None) -> None:
        file.seek(offset)
        self.writes.append(file.read(count))


def _respond(response_class: type, method: str, headers: list[tuple[str, str]], body: list[bytes],
             monkeypatch: pytest.MonkeyPatch, sock: Optional[_Sent] = None) -> list[bytes]:
    from types import SimpleNamespace

    from gunicorn import util
    from gunicorn.config import Config

    monkeypatch.setattr(util, "http_date", lambda *args: "Fri, 27 Nov 2026 00:00:00 GMT")
    sock = sock or _Sent()
    request = SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False)
    response = response_class(request, sock, Config())
    response.start_response("200 OK", headers)
    for piece in body:
        response.write(piece)
    response.close()
    return sock.writes


@pytest.mark.parametrize("method, headers, body", [
    ("GET", [("Content-Type", "application/json"), ("Content-Length", "15")], [b'{"status":"ok"}']),
    ("GET", [("Content-Length", "6")], [b"abc", b"def"]),
    ("HEAD", [("Content-Length", "15")], [b'{"status":"ok"}']),
    ("GET", [("Content-Length", "0")], []),
    ("GET", [("Content-Type", "text/plain")], [b"chunk one", b"chunk two"]),
])
def test_a_response_sends_the_same_bytes_as_gunicorns_with_its_head_joined_to_the_body(
        method: str, headers: list[tuple[str, str]], body: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    from config.gunicorn import OneWriteResponse

    gunicorns = OneWriteResponse.__bases__[0]  # the module's name may point at ours once a worker started
    theirs = _respond(gunicorns, method, headers, body, monkeypatch)
    ours = _respond(OneWriteResponse, method, headers, body, monkeypatch)

    assert b"".join(ours) == b"".join(theirs)
    assert ours[0].startswith(b"HTTP/1.1 200 OK\r\n")
    if not any(name == "Content-Length" for name, _ in headers):
        assert ours == theirs  # chunked: the head goes out at once, as gunicorn sends it
    elif body and method == "GET":
        assert len(ours) == len(theirs) - 1
    else:
        assert len(ours) == len(theirs) == 1


def test_a_response_that_fits_is_one_send_and_the_rest_of_one_that_does_not_follows_with_sendall(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from config.gunicorn import OneWriteResponse

    headers, body = [("Content-Length", "15")], [b'{"status":"ok"}']
    roomy, tight = _Sent(), _Sent(room=20)
    whole = _respond(OneWriteResponse, "GET", headers, body, monkeypatch, roomy)
    split = _respond(OneWriteResponse, "GET", headers, body, monkeypatch, tight)

    assert roomy.calls == ["send"] and len(whole) == 1
    assert tight.calls == ["send", "sendall"] and len(split[0]) == 20
    assert b"".join(split) == whole[0]


def test_a_file_sent_with_sendfile_follows_its_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from types import SimpleNamespace

    from gunicorn import util
    from gunicorn.config import Config

    from config.gunicorn import OneWriteResponse

    monkeypatch.setattr(util, "http_date", lambda *args: "Fri, 27 Nov 2026 00:00:00 GMT")
    path = tmp_path / "payload.bin"
    path.write_bytes(b"file bytes")
    sock = _Sent()
    request = SimpleNamespace(version=(1, 1), method="GET", should_close=lambda: False)
    response = OneWriteResponse(request, sock, Config())
    response.start_response("200 OK", [("Content-Length", "10")])
    with open(path, "rb") as handle:
        assert response.sendfile(SimpleNamespace(filelike=handle))
    response.close()

    assert sock.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and sock.writes[0].endswith(b"\r\n\r\n")
    assert sock.writes[1:] == [b"file bytes"]



def test_the_worker_answers_with_one_write_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.http import wsgi

    from config.gunicorn import OneWriteResponse, send_heads_with_bodies

    monkeypatch.setattr(wsgi, "Response", wsgi.Response)
    send_heads_with_bodies()
    assert wsgi.Response is OneWriteResponse
