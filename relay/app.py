"""The application factory: builds the relay from settings and wires its parts once."""
from __future__ import annotations

import functools
import logging
import os
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional

from flask import Flask

from config.settings import Settings, load_settings
from middleware.flags import RuntimeFlags
from middleware.routing import StoreRouter
from middleware.stats import RoutingStats
from relay.agents.auth import AgentAuth
from relay.agents.bus import AgentBus
from relay.agents.channel import register_agent_channel
from relay.agents.sessions import SessionRegistry
from relay.domains import audit, idempotency, inflight, locale, machines, ratelimit, templates
from relay.lifecycle import Lifecycle
from relay.lifecycle.agent_events import AgentEvents
from relay.lifecycle.commands import CommandActions
from relay.lifecycle.context import AuditTrail, Domains, LifecycleContext
from relay.lifecycle.dispatched import KeptFromSender
from relay.lifecycle.inbound import InboundPipeline
from relay.lifecycle.leader import LeaderLease
from relay.lifecycle.notify import ResultNotifier, ResultPoster, TextPusher
from relay.lifecycle.recovery import StoreRecovery
from relay.lifecycle.sweeps import Sweeper
from relay.lifecycle.views import AdminViews
from relay.routes import register_routes
from relay.routes.wecom_io import CryptoConfig
from relay.stores.base import Store
from relay.stores.factory import build_backends
from relay.stores.keys import KeySpace
from relay.stores.redis import RedisStore
from relay.metrics import StoreMetrics
from relay.telemetry import configure_logging, request_id
from relay.wecom.api import WeComApiClient, WeComApiConfig
from relay.wecom.webhook import post_result_webhook

log = logging.getLogger("relay.app")

DOMAINS = {d.name: d for d in (idempotency.DOMAIN, machines.DOMAIN, inflight.DOMAIN, audit.DOMAIN,
                               templates.DOMAIN, ratelimit.DOMAIN, locale.DOMAIN)}


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Relay:
    """Everything a route needs, at ``app.extensions["relay"]``."""

    settings: Settings
    router: StoreRouter
    lifecycle: Lifecycle
    views: AdminViews
    agent_events: AgentEvents
    sessions: SessionRegistry
    sweeper: Sweeper
    notifier: ResultNotifier
    clock: Callable[[], int]
    crypto_random: Callable[[int], bytes]
    flags: RuntimeFlags
    store_stats: RoutingStats
    metrics: StoreMetrics
    #: Delivery to agents held by other processes (Redis configured), else ``None``.
    bus: Optional[AgentBus] = None
    #: Restores state after a Redis data loss and runs a deferred audit hydration.
    recovery: Optional[StoreRecovery] = None

    @functools.cached_property
    def crypto_config(self) -> CryptoConfig:
        """The callback's WeCom secrets, read from the (frozen) settings once instead of per request."""
        return CryptoConfig.from_settings(self.settings)

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        self.flags.stop()
        self.sweeper.stop()
        if self.bus is not None:
            self.bus.stop()
        self.notifier.shutdown(wait=False)
        self.router.close()


def _push_clients(settings: Settings) -> tuple[Optional[TextPusher], Optional[ResultPoster]]:
    """The WeCom API push when corp id, secret and agent id are all set; the webhook when its URL is."""
    wecom: Optional[TextPusher] = None
    if settings.wecom_corp_id and settings.wecom_agent_secret and settings.wecom_agent_id:
        client = WeComApiClient(base_url=settings.wecom_api_base_url)
        config = WeComApiConfig(settings.wecom_corp_id, settings.wecom_agent_secret, settings.wecom_agent_id)
        wecom = functools.partial(client.send_text, config)
    webhook: Optional[ResultPoster] = None
    if settings.result_webhook_url:
        webhook = functools.partial(post_result_webhook, settings.result_webhook_url)
    return wecom, webhook


def create_app(
    settings: Optional[Settings] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    backends: Optional[Mapping[str, Store]] = None,
    clock: Callable[[], int] = wall_clock_ms,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    crypto_random: Callable[[int], bytes] = secrets.token_bytes,
    wecom: Optional[TextPusher] = None,
    webhook: Optional[ResultPoster] = None,
    start_background: bool = True,
) -> Flask:
    """Build the relay. ``settings`` default to the process environment (validated)."""
    if settings is None:
        settings = load_settings(os.environ if environ is None else environ)
    configure_logging(settings.log_level)

    backend_map = dict(backends) if backends is not None else build_backends(settings)
    keys = KeySpace(settings.store_app, settings.store_env)
    store_metrics = StoreMetrics()
    store_stats = RoutingStats(refresh=store_metrics.fold)
    store_metrics.add_fold_listener(store_stats.count)
    router = StoreRouter(keys, DOMAINS, backend_map, settings.plans, observer=store_metrics)
    flags = RuntimeFlags(settings, router, on_change=store_metrics.flags_changed)
    flags.load()
    store_metrics.set_plans(router.plans)
    redis_backend = backend_map.get("redis")
    if isinstance(redis_backend, RedisStore):
        if redis_backend.breaker is not None:
            store_metrics.watch_breaker(redis_backend.breaker)
        store_metrics.watch_retries("redis", redis_backend.counters.snapshot)
    provide = router.provider
    domains = Domains(
        idempotency=idempotency.IdempotencyKeys(provide("idempotency"), settings.idempotency_ttl_ms),
        machines=machines.MachineRegistry(provide("machines"), settings.machine_ttl_ms,
                                          settings.machine_heartbeat_timeout_ms),
        inflight=inflight.InflightCommands(provide("inflight"), settings.inflight_ttl_ms),
        audit=audit.AuditIndex(provide("audit"), settings.audit_max_records,
                               settings.audit_max_events_per_command),
        templates=templates.RetryTemplates(provide("templates"), settings.command_template_ttl_ms,
                                           settings.command_template_max),
        ratelimit=ratelimit.RateLimiter(provide("ratelimit"), settings.rate_limit_per_minute),
        locale=locale.UserLocales(provide("locale"), settings.locale_ttl_ms),
    )
    sessions = SessionRegistry()
    ctx = LifecycleContext(settings=settings, domains=domains, sessions=sessions,
                           audit=AuditTrail(domains.audit, settings.audit_log_path), clock=clock, new_id=new_id)
    if settings.redis_url and "redis" in backend_map:
        ctx.bus = AgentBus(settings.redis_url, keys, ctx.instance_id, sessions,
                           listener=KeptFromSender(ctx.dispatched))
    if wecom is None and webhook is None:
        wecom, webhook = _push_clients(settings)
    notifier = ResultNotifier(ctx, router.bound, wecom, webhook)
    agent_events = AgentEvents(ctx, notifier)
    recovery = StoreRecovery(ctx, agent_events, router.bound, check_loss=(
        redis_backend.check_data_loss if isinstance(redis_backend, RedisStore) else None))
    if isinstance(redis_backend, RedisStore):
        def data_lost() -> None:
            router.redis_data_lost()
            recovery.data_lost()

        redis_backend.watch_data_loss(keys.index_key("store", "epoch"), data_lost)
    lease = LeaderLease(provide("inflight"), "sweeps", ctx.instance_id, 3 * settings.sweep_interval_ms)
    sweeper = Sweeper(ctx, notifier, router.bound, lease)
    relay = Relay(
        settings=settings,
        router=router,
        lifecycle=Lifecycle(InboundPipeline(ctx), CommandActions(ctx)),
        views=AdminViews(ctx, lambda: _store_status(settings, router),
                         lambda: store_metrics.domains_summary()),
        metrics=store_metrics,
        agent_events=agent_events,
        sessions=sessions,
        sweeper=sweeper,
        notifier=notifier,
        clock=clock,
        crypto_random=crypto_random,
        flags=flags,
        store_stats=store_stats,
        bus=ctx.bus,
        recovery=recovery,
    )

    app = Flask("relay", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["relay"] = relay
    _scope_each_request(app, router, sessions)
    register_routes(app)
    register_agent_channel(
        app, sessions, agent_events,
        frame_scope=lambda: router.bound(fresh=True),
        auth=AgentAuth.from_settings(settings),
        ping_interval_s=settings.agent_ping_interval_ms / 1000,
        max_message_bytes=settings.agent_max_message_bytes,
        idle_timeout_s=settings.agent_idle_timeout_ms / 1000,
        max_connections=settings.max_agent_connections,
    )

    hydrated = recovery.hydrate_at_startup()
    if hydrated:
        log.info("audit log hydrated", extra={"event": "audit_hydrated", "events": hydrated})
    if settings.admin_token is None:
        log.warning("RELAY_ADMIN_TOKEN is not set: admin routes are open", extra={"event": "admin_open"})
    if not AgentAuth.from_settings(settings).enabled:
        log.warning("AGENT_AUTH_TOKEN and AGENT_TOKENS are not set: any client reaching /agent may speak for "
                    "any machine", extra={"event": "agent_auth_off"})
    if start_background:
        store_metrics.start()
        router.start()
        flags.start()
        if ctx.bus is not None:
            ctx.bus.start()
        sweeper.start()
        if redis_backend is not None:
            recovery.start()
    return app


def _scope_each_request(app: Flask, router: StoreRouter, sessions: SessionRegistry) -> None:
    """Each request binds one store snapshot and holds its agent frames until it ends: the trace
    frames then go out with its command, or together at the end (under gevent, with the socket's
    next write if that comes within ``HELD_LINGER_S``: usually the agent's result).

    The two scopes are kept in a context variable of this function's own rather than on ``flask.g``,
    whose every read goes through a proxy."""
    entered: ContextVar[Optional[tuple[Any, Any]]] = ContextVar("request_scopes", default=None)

    @app.before_request
    def begin() -> None:
        request_id.set(f"{random.getrandbits(64):016x}")
        scope, frames = router.bound(), sessions.holding(linger=True)
        scope.__enter__()
        entered.set((scope, frames))
        frames.__enter__()

    @app.teardown_request
    def end(_exc: Optional[BaseException]) -> None:
        scopes = entered.get()
        entered.set(None)
        if scopes is not None:
            scope, frames = scopes
            try:
                frames.__exit__(None, None, None)
            finally:
                scope.__exit__(None, None, None)


def _store_status(settings: Settings, router: StoreRouter) -> dict[str, Any]:
    """The reference's store diagnostics, from the plans in force and the Redis backend's health."""
    redis = router.backends.get("redis")
    errors = 0
    degraded = False
    if redis is not None and hasattr(redis, "counters"):
        errors = redis.counters.snapshot().get("errors", 0)
        degraded = bool(getattr(redis, "degraded", getattr(redis, "breaker_state", "closed") != "closed"))
    redis_authoritative = any(plan.backend == "redis" for plan in router.plans.values())
    status: dict[str, Any] = {"configuredMode": settings.store_backend,
                              "mode": "redis" if redis_authoritative and not degraded else "memory",
                              "degraded": degraded, "redisErrorCount": errors}
    last_error = getattr(redis, "last_error", None)
    if last_error:
        status["lastRedisError"] = last_error
    return status
