"""Admin authentication for the ops routes (reference §2.0).

With no admin token configured the routes are open, as in the reference (the app warns
at startup). Otherwise the ``x-admin-token`` header must equal the token; unlike the
reference the comparison is constant-time, on the header's raw bytes against the
token's UTF-8 bytes. Failure is 401 ``{"error":"unauthorized_admin_request"}``.
"""
from __future__ import annotations

import hmac
from typing import Optional

from flask import Response, request

from relay.routes.app_context import current_relay
from relay.routes.responses import error_response

ADMIN_HEADER = "x-admin-token"


def _raw_bytes(value: str) -> bytes:
    """WSGI hands header values over as latin-1 decoded text; recover the bytes sent."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def admin_authorized(admin_token: Optional[str], header_value: Optional[str]) -> bool:
    """Whether a request carrying ``header_value`` may use the ops routes."""
    if admin_token is None:
        return True
    if header_value is None:
        return False
    return hmac.compare_digest(_raw_bytes(header_value), admin_token.encode("utf-8"))


def require_admin() -> Optional[Response]:
    """A ``before_request`` hook: ``None`` to go on, or the 401 reply."""
    if admin_authorized(current_relay().settings.admin_token, request.headers.get(ADMIN_HEADER)):
        return None
    return error_response(401, "unauthorized_admin_request")
