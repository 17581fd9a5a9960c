"""Access to the relay application object and the request query, for the route modules."""
from __future__ import annotations

from typing import Any, Optional

from flask import current_app, request
from werkzeug.datastructures import MultiDict

RELAY_EXTENSION = "relay"


def current_relay() -> Any:
    """The relay object ``create_app`` stores at ``app.extensions["relay"]``."""
    return current_app.extensions[RELAY_EXTENSION]


def query_value(name: str) -> Optional[str]:
    """A query parameter as the reference sees it, or ``None`` when absent.

    fast-querystring turns a repeated key into an array, which JavaScript stringifies
    with commas; joining the values the same way keeps signatures and filters aligned.
    """
    return _joined(request.args, name)


def query_dict(*names: str) -> dict[str, str]:
    """The named query parameters that are present (each as ``query_value`` gives it)."""
    if not request.query_string:
        return {}
    args = request.args
    found = {}
    for name in names:
        value = _joined(args, name)
        if value is not None:
            found[name] = value
    return found


def _joined(args: MultiDict[str, str], name: str) -> Optional[str]:
    values = args.getlist(name)
    return ",".join(values) if values else None
