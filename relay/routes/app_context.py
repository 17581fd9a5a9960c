"""Access to the relay application object, the request and its query, for the route modules.

Each attribute read through one of Flask's proxies (``request.headers``) first fails on the proxy
itself, which builds and drops an ``AttributeError``, and then goes through the proxy's lookup.
The helpers here resolve a proxy once and read the object behind it.
"""
from __future__ import annotations

from typing import Any, Optional

from flask import Request, current_app, request
from werkzeug.datastructures import MultiDict

RELAY_EXTENSION = "relay"


def current_relay() -> Any:
    """The relay object ``create_app`` stores at ``app.extensions["relay"]``."""
    return current_app._get_current_object().extensions[RELAY_EXTENSION]  # type: ignore[attr-defined]


def current_request() -> Request:
    """The request being handled (the object behind Flask's ``request`` proxy)."""
    return request._get_current_object()  # type: ignore[attr-defined,no-any-return]


def query_value(name: str) -> Optional[str]:
    """A query parameter as the reference sees it, or ``None`` when absent.

    fast-querystring turns a repeated key into an array, which JavaScript stringifies
    with commas; joining the values the same way keeps signatures and filters aligned.
    """
    return _joined(current_request().args, name)


def query_dict(*names: str) -> dict[str, str]:
    """The named query parameters that are present (each as ``query_value`` gives it)."""
    req = current_request()
    if not req.query_string:
        return {}
    args = req.args
    found = {}
    for name in names:
        value = _joined(args, name)
        if value is not None:
            found[name] = value
    return found


def _joined(args: MultiDict[str, str], name: str) -> Optional[str]:
    values = args.getlist(name)
    return ",".join(values) if values else None
