"""A WSGI app that records the order it handles requests in, for tests of the server's scheduling.

``GET /healthz`` answers 200 (what ``live_relay`` waits for); ``GET /hit/<name>`` records ``name``;
``GET /busy/<name>`` records ``name`` and then keeps the worker busy for ``BUSY_S`` without yielding
to any other connection; ``GET /order`` answers the names recorded so far, as a JSON list, in the
order they were handled. ``GET /spin`` starts a greenlet (under gevent) that yields to the loop
without pause for ``SPIN_S`` (then records ``spin-done``), so that the loop always has something
to run: it is never idle.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

handled: list[str] = []
BUSY_S = 1.0
SPIN_S = 5.0


def _spin() -> None:
    import gevent

    until = time.monotonic() + SPIN_S
    while time.monotonic() < until:
        gevent.sleep(0)
    handled.append("spin-done")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path.startswith("/hit/"):
        handled.append(path[len("/hit/"):])
        body = b"ok"
    elif path.startswith("/busy/"):
        handled.append(path[len("/busy/"):])
        until = time.monotonic() + BUSY_S
        while time.monotonic() < until:
            pass
        body = b"ok"
    elif path == "/spin":
        import gevent

        gevent.spawn(_spin)
        body = b"ok"
    elif path == "/order":
        body = json.dumps(handled).encode()
    else:
        body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
