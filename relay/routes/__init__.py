"""The relay's HTTP layer: health, ops, WeCom callback routes and Fastify-shaped errors."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from flask import Flask

from relay.routes.admin import admin_blueprint
from relay.routes.app_context import RELAY_EXTENSION
from relay.routes.callback import make_callback_blueprint
from relay.routes.dashboard import dashboard_blueprint
from relay.routes.errors import register_error_handlers
from relay.routes.health import health_blueprint
from relay.routes.metrics_prometheus import metrics_prometheus_blueprint
from relay.routes.openapi import openapi_blueprint
from relay.routes.ops_tools import ops_tools_blueprint
from relay.routes.store_ops import store_ops_blueprint


def _check_no_clash(app: Flask, paths: Sequence[str]) -> None:
    """A callback path equal to another route fails startup, as it does in Fastify."""
    taken = {rule.rule for rule in app.url_map.iter_rules()}
    clashes = sorted(set(paths) & taken)
    if clashes:
        raise ValueError(f"WECOM_CALLBACK_PATH clashes with existing routes: {', '.join(clashes)}")


def register_routes(app: Flask, callback_routes: Optional[Sequence[str]] = None) -> None:
    """Register every HTTP route and the error handlers on ``app``.

    ``callback_routes`` defaults to ``app.extensions["relay"].settings.callback_routes``.
    Routing is made to match Fastify's for every rule added from here on: paths are
    matched exactly (no merging of ``//``) and no automatic OPTIONS replies.
    """
    if callback_routes is None:
        callback_routes = app.extensions[RELAY_EXTENSION].settings.callback_routes
    app.url_map.merge_slashes = False
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    register_error_handlers(app)
    app.register_blueprint(health_blueprint)
    app.register_blueprint(openapi_blueprint)
    app.register_blueprint(admin_blueprint)
    app.register_blueprint(metrics_prometheus_blueprint)
    app.register_blueprint(store_ops_blueprint)
    app.register_blueprint(ops_tools_blueprint)
    app.register_blueprint(dashboard_blueprint)
    _check_no_clash(app, callback_routes)
    app.register_blueprint(make_callback_blueprint(callback_routes))
