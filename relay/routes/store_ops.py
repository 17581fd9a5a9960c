"""Store migration ops routes (docs/migration.md), behind ``require_admin``.

* ``GET /ops/store``: whether the store is ``degraded`` (Redis configured and not answering,
  breaker not closed, or refusing writes) and the Redis backend's ``health``; per domain,
  the flags and phase in force, the Redis breaker state,
  backfill/warm-up progress, shadow counts, pending write-backs and this process's
  operation, error, fallback and secondary-write counts; the runtime flag overrides and
  where they come from; and the pid of the worker that answered.
* ``PUT /ops/store/flags``: change flags at runtime (``RuntimeFlags.update``); 400
  ``{"error":"invalid_store_flags","details":{...}}`` and nothing changes when refused.
* ``GET /ops/store/mismatches``: the redacted shadow-compare mismatch sample.
"""
from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response

from middleware.flags import FlagsRejected
from relay.routes.app_context import current_relay
from relay.routes.auth import require_admin
from relay.routes.body import read_body
from relay.routes.responses import json_response

store_ops_blueprint = Blueprint("store_ops", __name__)
store_ops_blueprint.before_request(require_admin)


def store_status(relay: Any) -> dict[str, Any]:
    """The body of ``GET /ops/store``."""
    router = relay.router
    redis = router.backends.get("redis")
    breaker = getattr(redis, "breaker_state", None)
    domains = router.describe()
    for domain, entry in domains.items():
        entry["breaker"] = breaker
        entry["counts"] = relay.store_stats.snapshot(domain)
    health = redis.health() if hasattr(redis, "health") else None
    return {"pid": os.getpid(), "degraded": bool(health and health["degraded"]), "redis": health,
            "flags": relay.flags.describe(), "domains": domains}


@store_ops_blueprint.get("/ops/store")
def ops_store() -> Response:
    return json_response(200, store_status(current_relay()))


@store_ops_blueprint.put("/ops/store/flags")
def ops_store_flags() -> Response:
    relay = current_relay()
    body = read_body(relay.settings.max_body_bytes)
    try:
        result = relay.flags.update(body)
    except FlagsRejected as exc:
        return json_response(400, exc.as_dict())
    return json_response(200, result.as_dict())


@store_ops_blueprint.get("/ops/store/mismatches")
def ops_store_mismatches() -> Response:
    return json_response(200, {"items": current_relay().router.shadow.mismatches()})
