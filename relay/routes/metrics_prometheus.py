"""``GET /metrics/prometheus``: the store metrics in Prometheus text format, behind ``require_admin``.

The body is ``StoreMetrics.exposition()``: under several gunicorn workers it merges every
worker's files, so any worker answers for all of them. Before rendering, the key cardinality
gauges (``relay_store_keys{domain,backend}``) are refreshed from the backends: the size of the
index of each indexed domain, and a prefix scan (cached for a minute) for the others; and
``relay_audit_link_behind_seconds`` from the audit records' linking watermark (a filtered
``/audit/recent`` reads every record written since it), unless the store does not answer.
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app

from typing import Optional

from relay.domains import audit, inflight, machines, templates
from relay.metrics import CONTENT_TYPE_LATEST, KeyCardinality
from relay.stores.base import StoreError
from relay.routes.app_context import current_relay
from relay.routes.auth import require_admin

#: Domains whose records are all listed in one index, and that index's name.
INDEXED = {"machines": machines.INDEX, "inflight": inflight.INDEX, "audit": audit.INDEX,
           "templates": templates.INDEX}
#: Domains counted by a prefix scan, where the backend can scan.
SCANNED = ("idempotency", "ratelimit", "locale")
_CARDINALITY = "relay.key_cardinality"

metrics_prometheus_blueprint = Blueprint("metrics_prometheus", __name__)
metrics_prometheus_blueprint.before_request(require_admin)


def _key_cardinality() -> KeyCardinality:
    """One sampler per app, so the scan cache lasts across scrapes."""
    sampler = current_app.extensions.get(_CARDINALITY)
    if sampler is None:
        router = current_relay().router
        binding = router.snapshot()
        sampler = KeyCardinality(
            router.backends,
            indexes={domain: binding.store(domain).index_key(index) for domain, index in INDEXED.items()},
            prefixes={domain: binding.store(domain).prefix for domain in SCANNED},
        )
        sampler = current_app.extensions.setdefault(_CARDINALITY, sampler)
    return sampler


def _audit_link_behind_s() -> Optional[float]:
    """Seconds from the audit linking watermark to the clock; ``None`` before the first pass.
    Raises ``StoreError``."""
    relay = current_relay()
    through = relay.router.store("audit").watermark(audit.INDEX)
    return None if through is None else max(0.0, (relay.clock() - through) / 1000)


@metrics_prometheus_blueprint.get("/metrics/prometheus")
def prometheus() -> Response:
    metrics = current_relay().metrics
    metrics.set_key_counts(_key_cardinality().counts())
    try:
        metrics.set_audit_link_behind(_audit_link_behind_s())
    except StoreError:
        pass  # the last value stays; the store's own metrics tell of the failure
    return Response(metrics.exposition(), status=200, content_type=CONTENT_TYPE_LATEST)
