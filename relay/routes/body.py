"""Request bodies parsed like the reference relay's Fastify parsers (reference §1 step 14).

* ``application/xml``, ``text/xml``, ``text/plain`` → the body as a string;
* ``application/x-www-form-urlencoded`` → a flat dict, the last value of a repeated key winning;
* ``application/json`` → any JSON value (empty body → 400 ``FST_ERR_CTP_EMPTY_JSON_BODY``,
  bad JSON → 400 ``FST_ERR_CTP_INVALID_JSON_BODY``);
* any other content type, or a body without one → 415, before the body is read;
* no content type and no body → ``None``.

Content-type parameters are ignored and bodies are decoded as UTF-8 (invalid bytes become
U+FFFD), as Node does. JSON nested deeper than Python's recursion limit counts as invalid
JSON (V8 would parse it; the body cap keeps such input small anyway). A body larger than the cap is refused with 413, from its
Content-Length when there is one and while reading otherwise (chunked bodies).
"""
from __future__ import annotations

from typing import Any, Optional

from flask import Request

from relay.jsontext import parse_strict
from relay.messages import parse_form_urlencoded_body
from relay.routes.app_context import current_request
from relay.routes.errors import body_too_large, empty_json_body, invalid_json_body, unsupported_media_type

STRING_TYPES = frozenset({"application/xml", "text/xml", "text/plain"})
FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


def media_type(content_type: Optional[str]) -> Optional[str]:
    """``"Application/XML; charset=utf-8"`` → ``"application/xml"``; blank → ``None``."""
    if content_type is None:
        return None
    value = content_type.split(";", 1)[0].strip().lower()
    return value or None


def parse_body(media: Optional[str], raw: bytes) -> Any:
    """Turn raw body bytes of a supported media type into the handler's body value."""
    if media == JSON_TYPE:
        if not raw:
            raise empty_json_body()
        try:
            return parse_strict(raw.decode("utf-8", errors="replace"))
        except ValueError:
            raise invalid_json_body() from None
    text = raw.decode("utf-8", errors="replace")
    if media == FORM_TYPE:
        return parse_form_urlencoded_body(text)
    if media in STRING_TYPES:
        return text
    raise unsupported_media_type()


def _has_body(req: Request) -> bool:
    """Fastify's test: a Transfer-Encoding header, or a Content-Length other than 0."""
    if req.headers.get("Transfer-Encoding") is not None:
        return True
    length = req.headers.get("Content-Length")
    return length is not None and length.strip() != "0"


def _read_capped(req: Request, max_bytes: int) -> bytes:
    length = req.content_length
    if length is not None and length > max_bytes:
        raise body_too_large()
    raw = req.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise body_too_large()
    return raw


def read_body(max_bytes: int) -> Any:
    """The current request's body, parsed; raises ``FastifyError`` (400, 413, 415)."""
    req = current_request()
    media = media_type(req.headers.get("Content-Type"))
    if media is None:
        if not _has_body(req):
            return None
        raise unsupported_media_type()
    if media != JSON_TYPE and media != FORM_TYPE and media not in STRING_TYPES:
        raise unsupported_media_type()
    return parse_body(media, _read_capped(req, max_bytes))
