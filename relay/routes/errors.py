"""Error replies in the shapes Fastify gives the reference relay (reference §2.12, §2.13).

* Unknown route: ``{"message":"Route GET:/x not found","error":"Not Found","statusCode":404}``
  with the method and the raw request target (query string included), as Fastify prints
  them. Fastify has no 405, so a known path with another method gets the same 404.
* Body parser failures (400 invalid/empty JSON, 413, 415) carry Fastify's ``code``.
* The store being unreachable (``StoreUnavailable``: Redis down, timing out, behind an
  open breaker or refusing writes, with no fallback to memory) is a 503
  ``{"error":"store_unavailable"}`` with ``Retry-After: 1``: the request changed nothing
  it could not undo, and the sender may retry (docs/failure-modes.md).
* Any other exception is a 500 ``{"statusCode":500,"error":"Internal Server Error",
  "message":"Internal Server Error"}``: unlike Fastify, the exception text is only
  logged, never sent, so secrets and library messages do not leak.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Union

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from relay.routes.responses import error_response, json_response
from relay.stores.base import StoreUnavailable

log = logging.getLogger("relay.routes")

#: Where Node's ``http.STATUS_CODES`` (which Fastify prints) differs from Python's phrases.
_NODE_PHRASES = {413: "Payload Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable"}


def status_phrase(status: int) -> str:
    """The reason phrase Node.js uses for ``status``."""
    if status in _NODE_PHRASES:
        return _NODE_PHRASES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Error"


class FastifyError(Exception):
    """An error answered as ``{"statusCode","code","error","message"}``."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message

    def payload(self) -> dict[str, object]:
        return {
            "statusCode": self.status_code,
            "code": self.code,
            "error": status_phrase(self.status_code),
            "message": self.message,
        }


def invalid_json_body() -> FastifyError:
    return FastifyError(
        400, "FST_ERR_CTP_INVALID_JSON_BODY", "Body is not valid JSON but content-type is set to 'application/json'"
    )


def empty_json_body() -> FastifyError:
    return FastifyError(
        400, "FST_ERR_CTP_EMPTY_JSON_BODY", "Body cannot be empty when content-type is set to 'application/json'"
    )


def unsupported_media_type() -> FastifyError:
    return FastifyError(415, "FST_ERR_CTP_INVALID_MEDIA_TYPE", "Unsupported Media Type")


def body_too_large() -> FastifyError:
    return FastifyError(413, "FST_ERR_CTP_BODY_TOO_LARGE", "Request body is too large")


def request_target() -> str:
    """The request target as the client sent it (Node's ``req.url``)."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if not raw:
        raw = request.environ.get("SCRIPT_NAME", "") + request.environ.get("PATH_INFO", "")
    query = request.environ.get("QUERY_STRING", "")
    if query and "?" not in raw:
        raw = f"{raw}?{query}"
    return raw


def route_not_found() -> Response:
    return json_response(
        404,
        {"message": f"Route {request.method}:{request_target()} not found", "error": "Not Found", "statusCode": 404},
    )


def _fastify_error(error: FastifyError) -> Response:
    return json_response(error.status_code, error.payload())


def _http_exception(error: HTTPException) -> Union[Response, HTTPException]:
    status = error.code or 500
    if status < 400:
        return error
    if isinstance(error, (NotFound, MethodNotAllowed)):
        return route_not_found()
    if isinstance(error, RequestEntityTooLarge):
        return _fastify_error(body_too_large())
    phrase = status_phrase(status)
    return json_response(status, {"statusCode": status, "error": phrase, "message": phrase})


def _store_unavailable(error: StoreUnavailable) -> Response:
    log.warning("store unavailable: request refused", extra={
        "event": "http_store_unavailable", "method": request.method,
        "route": request.url_rule.rule if request.url_rule is not None else None,
        "error": type(error.__cause__ or error).__name__})
    response = error_response(503, "store_unavailable")
    response.headers["Retry-After"] = "1"
    return response


def _unhandled(error: Exception) -> Response:
    log.error("unhandled error", exc_info=error,
              extra={"event": "http_unhandled_error", "method": request.method, "path": request.path})
    return json_response(
        500, {"statusCode": 500, "error": "Internal Server Error", "message": "Internal Server Error"}
    )


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(FastifyError, _fastify_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(StoreUnavailable, _store_unavailable)
    app.register_error_handler(Exception, _unhandled)
