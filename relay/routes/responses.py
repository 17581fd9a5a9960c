"""Response bodies and content types exactly as the reference relay sends them.

Fastify serialises replies with ``JSON.stringify``: compact, keys in insertion
order, non-ASCII text left as UTF-8. Its content types are
``application/json; charset=utf-8`` for JSON and a bare ``text/plain`` or
``application/xml`` for the replies the handlers type by hand (reference §2.0),
so every response here sets ``content_type`` explicitly: Werkzeug only appends a
charset when given a ``mimetype``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flask import Response

from relay.jsontext import compact

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain"
XML_CONTENT_TYPE = "application/xml"

_MAX_SAFE_INTEGER = 2**53 - 1
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _js_values(value: Any) -> Any:
    """Map floats to what ``JSON.stringify`` prints: 2.0 → 2 (``compact`` writes non-finite ones as null)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= _MAX_SAFE_INTEGER:
            return int(value)
        return value
    if isinstance(value, dict):
        return {key: _js_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_js_values(item) for item in value]
    return value


def dumps(payload: Any) -> str:
    """``JSON.stringify(payload)``: compact, UTF-8 text kept, lone surrogates escaped."""
    text = compact(_js_values(payload))
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


@dataclass(frozen=True)
class Rendered:
    """A finished reply (status, content type, text body), built without Flask."""

    status: int
    content_type: str
    body: str

    def to_response(self) -> Response:
        return Response(self.body.encode("utf-8"), status=self.status, content_type=self.content_type)


def json_rendered(status: int, payload: Any) -> Rendered:
    return Rendered(status, JSON_CONTENT_TYPE, dumps(payload))


def json_response(status: int, payload: Any) -> Response:
    return json_rendered(status, payload).to_response()


def error_response(status: int, error: str) -> Response:
    """The relay's own error shape, ``{"error": "<code>"}``."""
    return json_response(status, {"error": error})
