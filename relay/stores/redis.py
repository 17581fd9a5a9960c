"""``RedisStore``: the Redis backend (redis-py with hiredis).

How a call runs:

* Arguments are validated first (TTL, value type and size, limits), so an
  invalid call never reaches the network.
* The client and its connection pool are made lazily, once per process: when
  ``os.getpid()`` changes (gunicorn forked the worker) a new pool is made, and
  the parent's sockets are never used by the child.
* redis-py's own retries are off (``Retry(NoBackoff(), 0)``). Idempotent
  operations are retried by ``RetryPolicy`` on connection errors and timeouts
  only, within ``op_deadline_ms``; the others (``set_if_absent``,
  ``compare_and_set``, ``compare_and_delete``, ``incr``, ``acquire_lock``,
  ``release_lock``, ``index_trim``) are never retried, because a lost reply does not tell whether
  the write happened.
* Each attempt runs inside the circuit breaker. Only connection errors and
  timeouts count as breaker failures: a server that answers with an error
  (WRONGTYPE, OOM) is up. Connection errors, timeouts and an open breaker raise
  ``StoreUnavailable``, and so do writes the server refuses for want of memory
  (``maxmemory`` with ``noeviction``) or because it is a read-only replica: for
  the caller they are an outage of writes. Other server errors raise ``StoreError``.
* Health, for ``degraded`` and ``/ops/store``: whether the last call reached the
  server, the class of the last failure, and when writes were last refused.
* Data loss: with ``watch_data_loss`` the store keeps a marker key (a random
  epoch) and checks it on every new connection and on ``check_data_loss``. A
  marker gone or changed means the server lost its data (a restart without
  persistence, a flush); listeners are told once per loss.
* Atomic helpers are single commands (``SET NX PX``) or Lua scripts, each
  touching one key, so they are Redis Cluster-safe as they are.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar, Union

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from middleware.retry import RetryPolicy
from relay.stores.base import (
    DEFAULT_MAX_VALUE_BYTES,
    Store,
    StoreError,
    StoreUnavailable,
    validate_limit,
    validate_lock_ttl,
    validate_ttl,
    validate_value,
)

log = logging.getLogger("relay.stores")

T = TypeVar("T")
ClientFactory = Callable[[], redis.Redis]

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
#: Server answers that refuse a write for a while: handled like an outage, but not a breaker failure.
_WRITES_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
#: How long ``degraded`` stays true after the server last refused a write.
WRITE_REFUSAL_HOLD_S = 5.0

DataLossListener = Callable[[], None]
_GLOB_SPECIAL = re.compile(r"[\\*?\[\]]")

# KEYS[1]; ARGV: has_expected ("1"/"0"), expected, value, ttl_ms ("" = none)
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
"""

# KEYS[1]; ARGV: amount, ttl_ms. The TTL is set only when this call creates the counter.
_INCR_WITH_TTL = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""

# KEYS: the keys; ARGV: their values, then ttl_ms.
_MSET_WITH_TTL = """
local ttl = ARGV[#ARGV]
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'PX', ttl) end
return #KEYS
"""

# Lock release and compare_and_delete: delete KEYS[1] only while it holds ARGV[1].
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS[1]; ARGV: max_size. Removes and returns the lowest-scored members beyond max_size.
_INDEX_TRIM = """
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return {} end
local victims = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
return victims
"""


@dataclass(frozen=True)
class _Bound:
    """One process's client and the scripts registered on it."""

    pid: int
    client: redis.Redis
    compare_and_set: Script
    incr_with_ttl: Script
    mset_with_ttl: Script
    delete_if_equal: Script
    extend_lock: Script
    index_trim: Script


@dataclass(frozen=True)
class _Failed:
    """An error the server (or redis-py) raised while the server was reachable.

    It is returned through the breaker rather than raised, so it is not counted
    as a breaker failure, then raised by ``RedisStore._run``."""

    error: Exception


class StoreCounters:
    """Thread-safe event counters; only failure paths increment them."""

    NAMES = ("retries", "timeouts", "connection_errors", "errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str) -> None:
        with self._lock:
            self._values[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class _Health:
    """What the last calls said about the server (plain attributes: a stale read is harmless)."""

    def __init__(self) -> None:
        #: ``None`` until the first call ends; then whether it reached the server.
        self.reachable: Optional[bool] = None
        #: Class name of the last failure (never its text, which may name hosts or values).
        self.last_error: Optional[str] = None
        self.last_error_at: Optional[float] = None
        #: ``time.monotonic()`` of the last write the server refused (out of memory, read-only).
        self.writes_refused_at: Optional[float] = None
        self.writes_refused = 0
        self.data_losses = 0

    def failed(self, error: BaseException, reachable: bool) -> None:
        self.reachable = reachable
        self.last_error = type(error).__name__
        self.last_error_at = time.time()


def _ttl_arg(ttl_ms: Optional[int]) -> str:
    return "" if ttl_ms is None else str(ttl_ms)


def _check_amount(amount: object) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError(f"amount must be an integer, got {amount!r}")
    return amount


def _check_max_size(max_size: object) -> int:
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
        raise ValueError(f"max_size must be a non-negative integer, got {max_size!r}")
    return max_size


def _positive_ms(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer of milliseconds, got {value!r}")
    return value


class RedisStore(Store):
    """The ``Store`` interface on Redis.

    ``target`` is a ``redis://`` URL (the store builds its own client with the
    timeouts below and redis-py retries off) or a factory returning a ready
    client with ``decode_responses=True`` (fakeredis, or a custom pool); the
    factory is called once per process. ``op_deadline_ms`` bounds a whole
    operation, retries included, and must leave room for one attempt
    (connect plus socket timeout).
    """

    backend_name = "redis"

    def __init__(
        self,
        target: Union[str, ClientFactory],
        *,
        breaker: Optional[pybreaker.CircuitBreaker],
        retry: RetryPolicy = RetryPolicy(),
        socket_timeout_ms: int = 250,
        connect_timeout_ms: int = 250,
        op_deadline_ms: int = 800,
        max_connections: Optional[int] = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        super().__init__(max_value_bytes)
        self._target = target
        self.breaker = breaker
        self.retry = retry
        self.socket_timeout_ms = _positive_ms("socket_timeout_ms", socket_timeout_ms)
        self.connect_timeout_ms = _positive_ms("connect_timeout_ms", connect_timeout_ms)
        self.op_deadline_ms = _positive_ms("op_deadline_ms", op_deadline_ms)
        self._attempt_s = (socket_timeout_ms + connect_timeout_ms) / 1000.0
        if op_deadline_ms < socket_timeout_ms + connect_timeout_ms:
            raise ValueError("op_deadline_ms must cover one attempt: connect_timeout_ms + socket_timeout_ms")
        self._deadline_s = op_deadline_ms / 1000.0
        self._max_connections = max_connections
        self.counters = StoreCounters()
        self._health = _Health()
        self._bound: Optional[_Bound] = None
        self._bind_lock = threading.Lock()
        self._marker_key: Optional[str] = None
        self._epoch: Optional[str] = None
        self._marker_lock = threading.Lock()
        self._loss_listeners: list[DataLossListener] = []

    @classmethod
    def from_client(cls, client: redis.Redis, **kwargs: Any) -> "RedisStore":
        """A store over an existing client (fakeredis in tests). The caller keeps it per process."""
        return cls(lambda: client, **kwargs)

    # -- what telemetry reads ----------------------------------------------------------------
    @property
    def breaker_state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``; always ``"closed"`` without a breaker."""
        return pybreaker.STATE_CLOSED if self.breaker is None else self.breaker.current_state

    @property
    def last_error(self) -> Optional[str]:
        """Class name of the last failure (``TimeoutError``, ``OutOfMemoryError`` ...), or ``None``."""
        return self._health.last_error

    @property
    def degraded(self) -> bool:
        """The breaker is not closed, the last call did not reach the server, or a write was
        refused in the last ``WRITE_REFUSAL_HOLD_S`` seconds."""
        refused_at = self._health.writes_refused_at
        return (self.breaker_state != pybreaker.STATE_CLOSED or self._health.reachable is False
                or (refused_at is not None and time.monotonic() - refused_at < WRITE_REFUSAL_HOLD_S))

    def health(self) -> dict[str, Any]:
        """For ``/ops/store``: reachability, breaker, last failure, refused writes, data losses."""
        health = self._health
        return {
            "degraded": self.degraded,
            "reachable": health.reachable,
            "breaker": self.breaker_state,
            "lastError": health.last_error,
            "lastErrorAt": None if health.last_error_at is None else round(health.last_error_at, 3),
            "writesRefused": health.writes_refused,
            "dataLosses": health.data_losses,
        }

    def parser_name(self) -> str:
        """The RESP parser class of a live pooled connection (``"_HiredisParser"`` with hiredis)."""
        pool = self._client().connection_pool
        conn = pool.get_connection()
        try:
            return type(conn._parser).__name__
        finally:
            pool.release(conn)

    # -- client per process ------------------------------------------------------------------
    def _client(self) -> redis.Redis:
        return self._current().client

    def _current(self) -> _Bound:
        bound = self._bound
        if bound is not None and bound.pid == os.getpid():
            return bound
        with self._bind_lock:
            pid = os.getpid()
            if self._bound is None or self._bound.pid != pid:
                self._bound = self._bind(pid)
            return self._bound

    def _bind(self, pid: int) -> _Bound:
        if callable(self._target):
            client = self._target()
        else:
            client = redis.Redis.from_url(
                self._target,
                socket_timeout=self.socket_timeout_ms / 1000.0,
                socket_connect_timeout=self.connect_timeout_ms / 1000.0,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
                max_connections=self._max_connections,
                health_check_interval=0,
                redis_connect_func=self._on_connect,
            )
            if not HIREDIS_AVAILABLE:
                log.warning("hiredis is not installed: redis-py uses its pure-Python parser")
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisStore needs a client made with decode_responses=True")
        return _Bound(
            pid=pid,
            client=client,
            compare_and_set=client.register_script(_COMPARE_AND_SET),
            incr_with_ttl=client.register_script(_INCR_WITH_TTL),
            mset_with_ttl=client.register_script(_MSET_WITH_TTL),
            delete_if_equal=client.register_script(_DELETE_IF_EQUAL),
            extend_lock=client.register_script(_EXTEND_LOCK),
            index_trim=client.register_script(_INDEX_TRIM),
        )

    # -- running one operation -----------------------------------------------------------------
    def _run(self, op: Callable[[_Bound], T], idempotent: bool) -> T:
        bound = self._current()
        try:
            if idempotent:
                result = self.retry.call(
                    lambda: self._attempt(op, bound),
                    retryable=_is_transient,
                    deadline=self.retry.clock() + self._deadline_s,
                    attempt_s=self._attempt_s,
                    on_retry=self._on_retry,
                )
            else:
                result = self._attempt(op, bound)
        except pybreaker.CircuitBreakerError as exc:
            self.counters.add("errors")
            self._health.failed(exc, reachable=False)
            raise StoreUnavailable(f"redis circuit breaker is open: {exc}") from exc
        except _TRANSIENT as exc:
            self.counters.add("errors")
            self._health.failed(exc, reachable=False)
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc
        self._health.reachable = True
        if type(result) is _Failed:
            self.counters.add("errors")
            error = result.error
            self._health.failed(error, reachable=True)
            if isinstance(error, _WRITES_REFUSED):
                self._health.writes_refused += 1
                self._health.writes_refused_at = time.monotonic()
                raise StoreUnavailable(f"redis refuses writes: {type(error).__name__}") from error
            if isinstance(error, redis.RedisError):
                raise StoreError(f"redis error: {error}") from error
            raise error
        return result

    def _attempt(self, op: Callable[[_Bound], T], bound: _Bound) -> Union[T, _Failed]:
        if self.breaker is None:
            return self._guarded(op, bound)
        return self.breaker.call(self._guarded, op, bound)

    def _guarded(self, op: Callable[[_Bound], T], bound: _Bound) -> Union[T, _Failed]:
        """The part the breaker watches: only unreachability escapes as an exception."""
        try:
            return op(bound)
        except redis.TimeoutError:
            self.counters.add("timeouts")
            raise
        except redis.ConnectionError:
            self.counters.add("connection_errors")
            raise
        except Exception as exc:
            return _Failed(exc)

    def _on_retry(self, retry: int, error: BaseException, delay_s: float) -> None:
        self.counters.add("retries")
        log.info(
            "retrying redis operation",
            extra={"event": "store_retry", "retry": retry, "error": type(error).__name__},
        )

    # -- plain values --------------------------------------------------------------------------
    def get(self, key: str) -> Optional[str]:
        return self._run(lambda b: b.client.get(key), idempotent=True)

    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        self._run(lambda b: b.client.set(key, value, px=ttl_ms), idempotent=True)

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return self._run(lambda b: b.client.delete(*keys), idempotent=True)

    def mget(self, keys: Sequence[str]) -> list[Optional[str]]:
        keys = list(keys)
        if not keys:
            return []
        return self._run(lambda b: b.client.mget(keys), idempotent=True)

    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        ttl_ms = validate_ttl(ttl_ms)
        checked = {k: validate_value(v, self.max_value_bytes) for k, v in items.items()}
        if not checked:
            return
        if ttl_ms is None:
            self._run(lambda b: b.client.mset(checked), idempotent=True)
            return
        keys = list(checked)
        args = [checked[k] for k in keys] + [ttl_ms]
        self._run(lambda b: b.mset_with_ttl(keys=keys, args=args), idempotent=True)

    # -- atomic helpers --------------------------------------------------------------------------
    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        return bool(self._run(lambda b: b.client.set(key, value, nx=True, px=ttl_ms), idempotent=False))

    def compare_and_set(
        self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int] = None
    ) -> bool:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        if expected is not None and not isinstance(expected, str):
            raise TypeError(f"expected is a serialized string or None, got {type(expected).__name__}")
        args = ["0" if expected is None else "1", expected or "", value, _ttl_arg(ttl_ms)]
        return self._run(lambda b: b.compare_and_set(keys=[key], args=args), idempotent=False) == 1

    def compare_and_delete(self, key: str, expected: str) -> bool:
        expected = validate_value(expected, self.max_value_bytes)
        return self._run(lambda b: b.delete_if_equal(keys=[key], args=[expected]), idempotent=False) == 1

    def incr(self, key: str, amount: int = 1, ttl_ms: Optional[int] = None) -> int:
        ttl_ms = validate_ttl(ttl_ms)
        amount = _check_amount(amount)
        if ttl_ms is None:
            return self._run(lambda b: b.client.incrby(key, amount), idempotent=False)
        return self._run(lambda b: b.incr_with_ttl(keys=[key], args=[amount, ttl_ms]), idempotent=False)

    def ttl_ms(self, key: str) -> Optional[int]:
        remaining = self._run(lambda b: b.client.pttl(key), idempotent=True)
        return None if remaining < 0 else max(1, remaining)

    # -- locks -----------------------------------------------------------------------------------
    def acquire_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        ttl_ms = validate_lock_ttl(ttl_ms)
        token = validate_value(token, self.max_value_bytes)
        return bool(self._run(lambda b: b.client.set(key, token, nx=True, px=ttl_ms), idempotent=False))

    def release_lock(self, key: str, token: str) -> bool:
        token = validate_value(token, self.max_value_bytes)
        return self._run(lambda b: b.delete_if_equal(keys=[key], args=[token]), idempotent=False) == 1

    def extend_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        ttl_ms = validate_lock_ttl(ttl_ms)
        token = validate_value(token, self.max_value_bytes)
        return self._run(lambda b: b.extend_lock(keys=[key], args=[token, ttl_ms]), idempotent=True) == 1

    # -- sorted index ----------------------------------------------------------------------------
    def index_add(self, key: str, members: Mapping[str, float]) -> None:
        scores = {str(m): float(s) for m, s in members.items()}
        if scores:
            self._run(lambda b: b.client.zadd(key, scores), idempotent=True)

    def index_range(
        self,
        key: str,
        limit: Optional[int] = None,
        newest_first: bool = True,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
    ) -> list[tuple[str, float]]:
        limit = validate_limit(limit)
        if limit == 0:
            return []
        lo = "-inf" if min_score is None else float(min_score)
        hi = "+inf" if max_score is None else float(max_score)
        start, num = (None, None) if limit is None else (0, limit)

        def op(b: _Bound) -> list[tuple[str, float]]:
            if newest_first:
                return b.client.zrevrangebyscore(key, hi, lo, start=start, num=num, withscores=True)
            return b.client.zrangebyscore(key, lo, hi, start=start, num=num, withscores=True)

        return [(member, float(score)) for member, score in self._run(op, idempotent=True)]

    def index_remove(self, key: str, members: Iterable[str]) -> int:
        names = [str(m) for m in members]
        if not names:
            return 0
        return self._run(lambda b: b.client.zrem(key, *names), idempotent=True)

    def index_count(self, key: str) -> int:
        return self._run(lambda b: b.client.zcard(key), idempotent=True)

    def index_trim(self, key: str, max_size: int) -> list[str]:
        max_size = _check_max_size(max_size)
        return list(self._run(lambda b: b.index_trim(keys=[key], args=[max_size]), idempotent=False))

    # -- introspection ---------------------------------------------------------------------------
    def scan_keys(self, prefix: str) -> list[str]:
        pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", prefix) + "*"
        return self._run(lambda b: sorted(b.client.scan_iter(match=pattern, count=1000)), idempotent=True)

    def memory_usage(self, key: str) -> Optional[int]:
        """Bytes Redis attributes to ``key`` (``MEMORY USAGE``, nested values all counted); ``None`` if absent."""
        return self._run(lambda b: b.client.memory_usage(key, samples=0), idempotent=True)

    # -- data loss -------------------------------------------------------------------------------
    def watch_data_loss(self, marker_key: str, listener: DataLossListener) -> None:
        """Keep the marker ``marker_key`` and call ``listener`` (quickly: it runs in the thread that
        noticed, possibly a request's) each time the server is found to have lost its data."""
        self._marker_key = marker_key
        self._loss_listeners.append(listener)

    def check_data_loss(self) -> bool:
        """Look at the marker now; ``True`` when a loss was noticed. Raises ``StoreUnavailable``."""
        key = self._marker_key
        if key is None:
            return False
        return self._run(lambda b: self._inspect_marker(key, b.client.execute_command), idempotent=False)

    def _on_connect(self, connection: Any) -> None:
        """redis-py's hook for every new connection: the usual handshake, then the marker. The first
        command after a loss fails (``ConnectionError``), so it is not decided on the emptied server."""
        connection.on_connect()
        key = self._marker_key
        if key is None:
            return

        def execute(*args: Any) -> Any:
            connection.send_command(*args)
            return connection.read_response()

        if self._inspect_marker(key, execute):
            raise redis.ConnectionError("redis lost its data; restoring")

    def _inspect_marker(self, key: str, execute: Callable[..., Any]) -> bool:
        """Adopt the server's epoch; ``True`` when it is not the one this store saw before."""
        with self._marker_lock:
            current = execute("GET", key)
            if current is not None and current == self._epoch:
                return False
            if current is None:
                execute("SET", key, secrets.token_hex(8), "NX")
                current = execute("GET", key)
            lost, self._epoch = self._epoch is not None, current
        if lost:
            self._health.data_losses += 1
            log.error("redis lost its data (marker gone or replaced): restoring what this process holds",
                      extra={"event": "store_data_lost"})
            for listener in list(self._loss_listeners):
                try:
                    listener()
                except Exception as exc:  # noqa: BLE001 - a listener must not break the connection
                    log.error("data loss listener failed", extra={"event": "store_data_lost_listener_failed",
                                                                  "error": type(exc).__name__})
        return lost

    # -- lifecycle -------------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self._run(lambda b: b.client.ping(), idempotent=True))
        except StoreError:
            return False

    def close(self) -> None:
        with self._bind_lock:
            bound, self._bound = self._bound, None
        if bound is not None and bound.pid == os.getpid():
            bound.client.close()


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, _TRANSIENT)
