"""``GET /healthz``: always 200 ``{"status":"ok"}``, no auth (reference §2.1)."""
from __future__ import annotations

from flask import Blueprint, Response

from relay.routes.responses import json_response

health_blueprint = Blueprint("health", __name__)


@health_blueprint.get("/healthz")
def healthz() -> Response:
    return json_response(200, {"status": "ok"})
