"""The ops routes (reference §2.2-2.9), all behind ``require_admin``.

Deliberate changes from the reference:

* Authentication runs before the request body is read, so an unauthenticated caller
  gets 401 even when its body is malformed (Fastify parsed the body first).
* A command id in the path that is not a valid id (``relay.ids``: longer than 128
  characters, or with a control or format character) is refused with 400
  ``{"error":"invalid_command_id"}`` before any store is asked about it.
* A ``userId`` in the cancel/retry body that is not a string is ignored, exactly like
  an omitted one (the reference compared it as it was and answered 403).
"""
from __future__ import annotations

import math
import re
from typing import Optional

from flask import Blueprint, Response

from relay.ids import valid_id
from relay.messages import js_trim
from relay.routes.app_context import current_relay, query_value
from relay.routes.auth import require_admin
from relay.routes.body import read_body
from relay.routes.responses import error_response, json_response

DEFAULT_AUDIT_LIMIT = 50
#: Larger limits cannot return more records; this keeps store arguments in integer range.
MAX_AUDIT_LIMIT = 2**31 - 1

_JS_DECIMAL = re.compile(r"[+-]?(?:Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_JS_RADIX = re.compile(r"0(?:[xX](?P<hex>[0-9a-fA-F]+)|[oO](?P<oct>[0-7]+)|[bB](?P<bin>[01]+))")
_RADIX_BASES = {"hex": 16, "oct": 8, "bin": 2}

admin_blueprint = Blueprint("admin", __name__)
admin_blueprint.before_request(require_admin)


def js_number(text: str) -> float:
    """JavaScript ``Number(text)`` for a string: blank → 0, hex/octal/binary, else NaN."""
    value = js_trim(text)
    if not value:
        return 0.0
    radix = _JS_RADIX.fullmatch(value)
    if radix is not None:
        base = next(name for name in _RADIX_BASES if radix.group(name))
        try:
            return float(int(radix.group(base), _RADIX_BASES[base]))
        except OverflowError:
            return math.inf
    if _JS_DECIMAL.fullmatch(value):
        return float(value.replace("Infinity", "inf"))
    return math.nan


def audit_limit(raw: Optional[str]) -> int:
    """``limit`` of ``/audit/recent``: ``Number()``, non-finite → 50, at least 1, truncated."""
    number = js_number(raw) if raw is not None else float(DEFAULT_AUDIT_LIMIT)
    if not math.isfinite(number):
        number = float(DEFAULT_AUDIT_LIMIT)
    return min(int(max(1.0, number)), MAX_AUDIT_LIMIT)


def valid_command_id(command_id: str) -> bool:
    """A valid id (``relay.ids.valid_id``): at most 128 characters, no control or format characters."""
    return valid_id(command_id)


def _body_user_id() -> Optional[str]:
    """``userId`` of an optional cancel/retry body; anything but a non-empty string is no userId."""
    body = read_body(current_relay().settings.max_body_bytes)
    user_id = body.get("userId") if isinstance(body, dict) else None
    return user_id if isinstance(user_id, str) and user_id else None


def _filter(name: str) -> Optional[str]:
    return query_value(name) or None


@admin_blueprint.get("/metrics")
def metrics() -> Response:
    return json_response(200, current_relay().views.metrics())


@admin_blueprint.get("/ops/config")
def ops_config() -> Response:
    return json_response(200, current_relay().views.ops_config())


@admin_blueprint.get("/machines")
def machines() -> Response:
    return json_response(200, current_relay().views.machines())


@admin_blueprint.get("/inflight")
def inflight() -> Response:
    return json_response(200, current_relay().views.inflight())


@admin_blueprint.get("/audit/recent")
def audit_recent() -> Response:
    items = current_relay().views.audit_recent(
        audit_limit(query_value("limit")), _filter("userId"), _filter("machineId"), _filter("status")
    )
    return json_response(200, items)


@admin_blueprint.get("/commands/<command_id>")
def command(command_id: str) -> Response:
    if not valid_command_id(command_id):
        return error_response(400, "invalid_command_id")
    record = current_relay().views.command(command_id)
    if record is None:
        return error_response(404, "command_not_found")
    return json_response(200, record)


@admin_blueprint.post("/commands/<command_id>/cancel")
def cancel(command_id: str) -> Response:
    if not valid_command_id(command_id):
        return error_response(400, "invalid_command_id")
    status, payload = current_relay().lifecycle.cancel(command_id, _body_user_id())
    return json_response(status, payload)


@admin_blueprint.post("/commands/<command_id>/retry")
def retry(command_id: str) -> Response:
    if not valid_command_id(command_id):
        return error_response(400, "invalid_command_id")
    status, payload = current_relay().lifecycle.retry(command_id, _body_user_id())
    return json_response(status, payload)
