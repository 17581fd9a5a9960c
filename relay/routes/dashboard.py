"""``GET /ops/dashboard``: the operator page (admin).

One static HTML page (``dashboard.html`` beside this file, script and style inline, nothing from
another site) whose script polls ``/ops/store``, ``/metrics`` and ``/ops/store/mismatches`` every
2 s and draws the phase and flags per domain, the breaker state, latency percentiles, the error,
timeout, fallback and mismatch rates with small charts of the minutes it has been open, the
recent mismatches and the flag overrides in force.

A browser cannot send the ``x-admin-token`` header when it navigates, so this route alone also
accepts the token as ``?token=``; the page's script reads it from its own address and sends it as
the header on its API calls. The address then holds the admin token: the page is sent with
``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``, and its Content-Security-Policy
allows only its own inline script and style (by hash) and requests to this origin.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path
from typing import Optional

from flask import Blueprint, Response, request

from relay.routes.app_context import current_relay
from relay.routes.auth import ADMIN_HEADER, admin_authorized
from relay.routes.responses import error_response

PAGE = (Path(__file__).with_name("dashboard.html")).read_text(encoding="utf-8")
TOKEN_PARAM = "token"


def _csp_hash(tag: str) -> str:
    """The CSP source of the (single) inline ``<tag>`` element of the page."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S)
    if match is None:
        raise ValueError(f"dashboard.html has no inline <{tag}>")
    digest = hashlib.sha256(match.group(1).encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash('script')}; style-src {_csp_hash('style')}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

dashboard_blueprint = Blueprint("dashboard", __name__)


def _query_token_matches(admin_token: str, value: Optional[str]) -> bool:
    return value is not None and hmac.compare_digest(value.encode("utf-8"), admin_token.encode("utf-8"))


def dashboard_authorized() -> bool:
    """The admin header, or the token as ``?token=``, as the other ops routes would accept it."""
    admin_token = current_relay().settings.admin_token
    if admin_authorized(admin_token, request.headers.get(ADMIN_HEADER)):
        return True
    return admin_token is not None and _query_token_matches(admin_token, request.args.get(TOKEN_PARAM))


@dashboard_blueprint.get("/ops/dashboard")
def dashboard() -> Response:
    if not dashboard_authorized():
        return error_response(401, "unauthorized_admin_request")
    return Response(PAGE, status=200, content_type="text/html; charset=utf-8", headers=HEADERS)
