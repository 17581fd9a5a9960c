"""Access to the relay application object and the request query, for the route modules."""
from __future__ import annotations

from typing import Any, Optional

from flask import current_app, request

RELAY_EXTENSION = "relay"


def current_relay() -> Any:
    """The relay object ``create_app`` stores at ``app.extensions["relay"]``."""
    return current_app.extensions[RELAY_EXTENSION]


def query_value(name: str) -> Optional[str]:
    """A query parameter as the reference sees it, or ``None`` when absent.

    fast-querystring turns a repeated key into an array, which JavaScript stringifies
    with commas; joining the values the same way keeps signatures and filters aligned.
    """
    values = request.args.getlist(name)
    if not values:
        return None
    return ",".join(values)


def query_dict(*names: str) -> dict[str, str]:
    """The named query parameters that are present."""
    found = {name: query_value(name) for name in names}
    return {name: value for name, value in found.items() if value is not None}
