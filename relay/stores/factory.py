"""Builds the backends the settings ask for; nothing here knows Flask or phases."""
from __future__ import annotations

from config.redis_target import CLUSTER, parse_redis_url
from config.settings import Settings
from middleware.breaker import GuardedBreaker
from middleware.retry import RetryPolicy
from relay.stores.base import Store
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from relay.stores.redis_cluster import RedisClusterStore
from relay.stores.replication import ReplicaWait


def build_redis_store(settings: Settings) -> RedisStore:
    """A ``RedisStore`` (``RedisClusterStore`` for a cluster URL) with the settings' timeouts,
    ``REDIS_WAIT_REPLICAS`` and ``REDIS_MULTIPLEX``."""
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    breaker = GuardedBreaker(
        fail_max=settings.redis_breaker_fail_max,
        reset_timeout=settings.redis_breaker_reset_timeout_ms / 1000,
        throw_new_error_on_trip=False,
        name="redis",
    )
    store_class = RedisClusterStore if parse_redis_url(settings.redis_url).kind == CLUSTER else RedisStore
    return store_class(
        settings.redis_url,
        breaker=breaker,
        retry=RetryPolicy(max_retries=settings.redis_max_retries),
        socket_timeout_ms=settings.redis_socket_timeout_ms,
        connect_timeout_ms=settings.redis_connect_timeout_ms,
        op_deadline_ms=max(settings.redis_op_deadline_ms,
                           settings.redis_socket_timeout_ms + settings.redis_connect_timeout_ms),
        max_value_bytes=settings.store_max_value_bytes,
        replica_wait=ReplicaWait.for_domains(KeySpace(settings.store_app, settings.store_env),
                                             settings.redis_wait_replicas, settings.redis_wait_timeout_ms),
        multiplex=settings.redis_multiplex,
    )


def build_backends(settings: Settings) -> dict[str, Store]:
    """The memory backend always (default and fallback); Redis when a URL is configured."""
    backends: dict[str, Store] = {"memory": MemoryStore(max_value_bytes=settings.store_max_value_bytes)}
    if settings.redis_url:
        backends["redis"] = build_redis_store(settings)
    return backends
