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
* The URL may name one server, a primary managed by Sentinel or a Redis Cluster
  (``config/redis_target.py``); ``relay/stores/redis_connect.py`` makes the client.
  A cluster needs ``RedisClusterStore`` (``relay/stores/redis_cluster.py``).
* With ``replica_wait`` (``REDIS_WAIT_REPLICAS``), writes to the correctness-critical
  domains go through ``execute`` and are followed by ``WAIT`` on the same connection
  (``relay/stores/replication.py``).
* Atomic helpers are single commands (``SET NX PX``) or Lua scripts, each
  touching one key, so they are Redis Cluster-safe as they are. Three compound
  operations touch more: ``index_add_capped`` deletes the records of trimmed
  members, which share the index's slot in colocated domains (``{domain}`` hash
  tag, ``relay.stores.keys``); ``guarded_reserve`` touches a rate-limit counter and
  a reservation, and ``compare_and_set_then_claim`` an audit record and an in-flight
  record with its index entry, which do not share a slot, so each runs as one script
  only with ``cross_slot_scripts`` (a single server; turn it off for Redis Cluster,
  and the steps then take a round trip each).
* ``execute`` sends a list of operations in one pipeline (one round trip, no
  ``MULTI``): the unit of work (``middleware.unit_of_work``) uses it to carry
  deferred writes and prefetched reads with the call that needs an answer.
  Scripts in a pipeline are sent with ``EVAL`` (the server caches them by hash),
  since redis-py would spend a round trip on ``SCRIPT EXISTS`` for ``EVALSHA``.
  Under gevent those pipelines share one connection per worker, written together
  (``relay.stores.redis_multiplex``, ``multiplex``); one followed by ``WAIT`` keeps
  a pooled connection.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar, Union

import pybreaker
import redis
from redis.commands.core import Script
from redis.utils import HIREDIS_AVAILABLE

from middleware.observer import drain
from middleware.retry import RetryPolicy
from relay.locks import compute_lock
from relay.stores.base import (
    DEFAULT_MAX_VALUE_BYTES,
    Claim,
    CounterGuard,
    Op,
    Store,
    StoreError,
    StoreUnavailable,
    validate_limit,
    validate_lock_ttl,
    validate_ttl,
    validate_value,
)
from relay.stores.keys import LUA_ESCAPE_ID, escape_id
from relay.stores.redis_connect import ClientOptions, connect, is_cluster
from relay.stores.redis_pipeline import ConnectionPipeline, Connections
from relay.stores.replication import ReplicaWait

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

# compare_and_set(key, has_expected ("1"/"0"), expected, value, ttl_ms ("" = none)): true when written.
_LUA_COMPARE_AND_SET = """
local function compare_and_set(key, has_expected, expected, value, ttl_ms)
  local current = redis.call('GET', key)
  if has_expected == '1' then
    if current ~= expected then return false end
  elseif current then
    return false
  end
  if ttl_ms == '' then
    redis.call('SET', key, value)
  else
    redis.call('SET', key, value, 'PX', ttl_ms)
  end
  return true
end
"""

# KEYS[1]; ARGV: has_expected, expected, value, ttl_ms, as compare_and_set above.
_COMPARE_AND_SET = _LUA_COMPARE_AND_SET + """
if compare_and_set(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 1 end
return 0
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


# A watermark's members (``relay.stores.base``) read with one command, and what they vouch for.
_LUA_WATERMARK = """
local function watermark_marks(mark)
  local marks, flat = {}, redis.call('ZRANGE', mark, 0, -1, 'WITHSCORES')
  for i = 1, #flat, 2 do marks[flat[i]] = tonumber(flat[i + 1]) end
  return marks
end
local function vouched(marks)
  if marks.through and marks.late and marks.late - 0.5 < marks.through then return marks.late - 0.5 end
  return marks.through
end
local function watermark_lower(mark, score)
  local marks = watermark_marks(mark)
  local top = marks.through
  if marks.target and (not top or marks.target > top) then top = marks.target end
  if not top or score > top then return end
  if not marks.late or score < marks.late then redis.call('ZADD', mark, score, 'late') end
end
"""

# KEYS[1] the watermark; ARGV[1] the lowest score just added.
_WATERMARK_LOWER = _LUA_WATERMARK + """
watermark_lower(KEYS[1], tonumber(ARGV[1]))
return 0
"""

# KEYS[1] the watermark; ARGV[1] the pass's upto. Returns the start (a string: Lua numbers come back
# as integers) or false.
_WATERMARK_BEGIN = _LUA_WATERMARK + """
local marks = watermark_marks(KEYS[1])
local start = vouched(marks)
if start then redis.call('ZADD', KEYS[1], start, 'through') end
if not marks.target then redis.call('ZREM', KEYS[1], 'late') end
redis.call('ZADD', KEYS[1], ARGV[1], 'target')
return start and string.format('%.17g', start)
"""

# KEYS[1] the watermark; ARGV[1] the pass's upto. Returns what the watermark vouches for (a string) or false.
_WATERMARK_END = _LUA_WATERMARK + """
local upto = tonumber(ARGV[1])
local marks = watermark_marks(KEYS[1])
if marks.target == upto then
  marks.through = upto
  if marks.late and marks.late - 0.5 < upto then marks.through = marks.late - 0.5 end
  marks.late = nil
  redis.call('ZADD', KEYS[1], marks.through, 'through')
  redis.call('ZREM', KEYS[1], 'target', 'late')
end
local now = vouched(marks)
return now and string.format('%.17g', now)
"""

# KEYS[1] the index; ARGV: max_size, record_prefix, then member/score pairs. Adds, trims the lowest
# beyond max_size and deletes their records; returns {dropped, dropped whose key needs a hash}.
_INDEX_ADD = """
local key = KEYS[1]
local low
for i = 3, #ARGV, 2 do
  redis.call('ZADD', key, ARGV[i + 1], ARGV[i])
  local score = tonumber(ARGV[i + 1])
  if not low or score < low then low = score end
end
"""
_INDEX_TRIM_DELETING = """
local excess = redis.call('ZCARD', key) - tonumber(ARGV[1])
if excess <= 0 then return {{}, {}} end
local victims = redis.call('ZRANGE', key, 0, excess - 1)
redis.call('ZREMRANGEBYRANK', key, 0, excess - 1)
local hashed = {}
for _, member in ipairs(victims) do
  local id = escape_id(member)
  if id then redis.call('DEL', ARGV[2] .. id) else hashed[#hashed + 1] = member end
end
return {victims, hashed}
"""
_INDEX_ADD_CAPPED = LUA_ESCAPE_ID + _INDEX_ADD + _INDEX_TRIM_DELETING
# The same with KEYS[2], the index's watermark, lowered to the lowest score added.
_INDEX_ADD_CAPPED_WATERMARKED = LUA_ESCAPE_ID + _LUA_WATERMARK + _INDEX_ADD + """
if low then watermark_lower(KEYS[2], low) end
""" + _INDEX_TRIM_DELETING

# KEYS: indexes; ARGV: for each index in order, its member count, then that many member/score pairs.
_INDEX_ADD_EACH = """
local at = 1
for k = 1, #KEYS do
  local last = at + 2 * tonumber(ARGV[at])
  for i = at + 1, last, 2 do redis.call('ZADD', KEYS[k], ARGV[i + 1], ARGV[i]) end
  at = last + 1
end
return #KEYS
"""

# KEYS: counter, reservation; ARGV: amount, counter_ttl_ms ("" = none), limit, value, ttl_ms ("" = none).
_GUARDED_RESERVE = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if created and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count > tonumber(ARGV[3]) then return {count, 0} end
local ok
if ARGV[5] == '' then ok = redis.call('SET', KEYS[2], ARGV[4], 'NX')
else ok = redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) end
if ok then return {count, 1} end
return {count, 0}
"""

# KEYS: the record written, the record claimed, the claimed one's index; ARGV: has_expected, expected,
# value, ttl_ms as in _COMPARE_AND_SET, then the claimed record's expected value and its index member.
# Returns {written, claimed}: nothing is claimed unless the write happened.
_COMPARE_AND_SET_THEN_CLAIM = _LUA_COMPARE_AND_SET + """
if not compare_and_set(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return {0, 0} end
redis.call('ZREM', KEYS[3], ARGV[6])
if redis.call('GET', KEYS[2]) == ARGV[5] then return {1, redis.call('DEL', KEYS[2])} end
return {1, 0}
"""


@dataclass(slots=True)
class _Queued:
    """One operation ready for a pipeline: its command and how to read its raw reply. Not frozen:
    a frozen dataclass sets each field through ``object.__setattr__``, nearly three times the cost,
    for some 17 per Redis-mode callback."""

    command: tuple[Any, ...]
    convert: Callable[[Any], Any]
    idempotent: bool


def _same(reply: Any) -> Any:
    return reply


def _nothing(reply: Any) -> None:
    return None


def _is_ok(reply: Any) -> bool:
    """``SET ... NX``: ``OK`` when set, nil when the key existed."""
    return reply is not None


def _is_one(reply: Any) -> bool:
    return reply == 1


def _px(ttl_ms: Optional[int]) -> tuple[Any, ...]:
    return () if ttl_ms is None else ("PX", ttl_ms)


def _score_pairs(reply: list[Any]) -> list[tuple[str, float]]:
    """A ``WITHSCORES`` reply as (member, score) pairs: RESP3 sends pairs, RESP2 a flat list."""
    if reply and type(reply[0]) is list:
        return [(member, float(score)) for member, score in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]


def _pad(args: tuple[Any, ...], size: int) -> tuple[Any, ...]:
    """Positional arguments with the optional trailing ones (all defaulting to ``None``) filled in."""
    return (*args, *(None,) * (size - len(args)))


@dataclass(frozen=True)
class _Bound:
    """One process's client and the scripts registered on it."""

    pid: int
    client: redis.Redis
    #: Connections for pipelines (``None`` for a Redis Cluster client, which has one pool per node).
    connections: Optional[Connections]
    compare_and_set: Script
    incr_with_ttl: Script
    mset_with_ttl: Script
    delete_if_equal: Script
    extend_lock: Script
    index_trim: Script
    compare_and_set_then_claim: Script
    watermark_lower: Script
    watermark_begin: Script
    watermark_end: Script


@dataclass(frozen=True)
class _Failed:
    """An error the server (or redis-py) raised while the server was reachable.

    It is returned through the breaker rather than raised, so it is not counted
    as a breaker failure, then raised by ``RedisStore._run``."""

    error: Exception


class StoreCounters:
    """Thread-safe event counters; only failure paths increment them.

    An event is queued (``deque.append`` needs no lock) and counted at the next ``snapshot``, or
    once ``FOLD_AT`` are queued: while the breaker is open every store call is one."""

    NAMES = ("retries", "timeouts", "connection_errors", "errors")
    FOLD_AT = 1024

    def __init__(self) -> None:
        self._lock = compute_lock()
        self._values = dict.fromkeys(self.NAMES, 0)
        self._queued: deque[str] = deque()

    def add(self, name: str, count: int = 1) -> None:
        if name not in self._values:
            raise KeyError(name)
        if count != 1:
            with self._lock:
                self._values[name] += count
            return
        queued = self._queued
        queued.append(name)
        if len(queued) >= self.FOLD_AT:
            self._fold()

    def snapshot(self) -> dict[str, int]:
        self._fold()
        with self._lock:
            return dict(self._values)

    def _fold(self) -> None:
        with self._lock:
            for name, n in Counter(drain(self._queued)).items():
                self._values[name] += n


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


#: What ``refuses_calls`` records as the last error, as ``execute`` would for a refused call.
_REFUSED = pybreaker.CircuitBreakerError("circuit breaker open")


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
    #: Splits multi-key operations by hash slot (``RedisClusterStore``).
    cluster_aware = False

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
        cross_slot_scripts: bool = True,
        replica_wait: Optional[ReplicaWait] = None,
        multiplex: bool = True,
    ) -> None:
        super().__init__(max_value_bytes)
        #: Round trips from gevent greenlets share one connection (``relay.stores.redis_multiplex``).
        self.multiplex = multiplex
        #: ``WAIT`` after writes of the correctness-critical domains (``relay.stores.replication``).
        self.replica_wait = replica_wait
        #: Scripts may touch keys of different slots (one server, not Redis Cluster).
        self.cross_slot_scripts = cross_slot_scripts
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
        # Re-entrant: the periodic check holds it while its command may open a new connection,
        # whose hook inspects the marker too.
        self._marker_lock = threading.RLock()
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

    def refuses_calls(self) -> bool:
        """Counted as ``execute`` counts a call the breaker refuses."""
        if self.breaker is None or not self.breaker.refuse_now():
            return False
        self.counters.add("errors")
        self._health.failed(_REFUSED, reachable=False)
        return True

    @property
    def data_losses(self) -> int:
        return self._health.data_losses

    def count_refused(self, calls: int) -> None:
        if self.breaker is not None:
            self.breaker.count_rejected(calls)
        self.counters.add("errors", calls)

    @property
    def last_error(self) -> Optional[str]:
        """Class name of the last failure (``TimeoutError``, ``OutOfMemoryError`` ...), or ``None``."""
        return self._health.last_error

    @property
    def degraded(self) -> bool:
        """The breaker is not closed, the last call did not reach the server, or a write was
        refused in the last ``WRITE_REFUSAL_HOLD_S`` seconds (and no write succeeded since, as far
        as ``check_data_loss`` found out)."""
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
            "sharedConnection": self._shared_connection_counts(),
        }

    def _shared_connection_counts(self) -> Optional[dict[str, int]]:
        """This process's shared connection (``relay.stores.redis_multiplex``): round trips carried
        and writes made; ``None`` while it has none."""
        bound = self._bound
        mine = bound is not None and bound.pid == os.getpid() and bound.connections is not None
        shared = bound.connections.shared_connection if mine else None
        return None if shared is None else {"roundTrips": shared.round_trips, "writes": shared.writes}

    def parser_name(self) -> str:
        """The RESP parser class of a live pooled connection (``"ReadinessParser"``, over hiredis)."""
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
            client = connect(self._target, ClientOptions(
                socket_timeout_s=self.socket_timeout_ms / 1000.0,
                connect_timeout_s=self.connect_timeout_ms / 1000.0,
                max_connections=self._max_connections,
                on_connect=self._on_connect,
            ))
            if not HIREDIS_AVAILABLE:
                log.warning("hiredis is not installed: redis-py uses its pure-Python parser")
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisStore needs a client made with decode_responses=True")
        if is_cluster(client) and not self.cluster_aware:
            raise ValueError("a Redis Cluster needs RedisClusterStore (relay.stores.redis_cluster)")
        return _Bound(
            pid=pid,
            client=client,
            connections=None if is_cluster(client) else Connections(client.connection_pool,
                                                                    multiplex=self.multiplex),
            compare_and_set=client.register_script(_COMPARE_AND_SET),
            incr_with_ttl=client.register_script(_INCR_WITH_TTL),
            mset_with_ttl=client.register_script(_MSET_WITH_TTL),
            delete_if_equal=client.register_script(_DELETE_IF_EQUAL),
            extend_lock=client.register_script(_EXTEND_LOCK),
            index_trim=client.register_script(_INDEX_TRIM),
            compare_and_set_then_claim=client.register_script(_COMPARE_AND_SET_THEN_CLAIM),
            watermark_lower=client.register_script(_WATERMARK_LOWER),
            watermark_begin=client.register_script(_WATERMARK_BEGIN),
            watermark_end=client.register_script(_WATERMARK_END),
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
        if self._waits_for(key):
            self.execute([Op("set", (key, value, ttl_ms))])
            return
        self._run(lambda b: b.client.set(key, value, px=ttl_ms), idempotent=True)

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return self._run(lambda b: b.client.delete(*keys), idempotent=True)

    def mget(self, keys: Sequence[str]) -> list[Optional[str]]:
        keys = list(keys)
        if not keys:
            return []
        return self._run(lambda b: self._mget(b, keys), idempotent=True)

    def mset(self, items: Mapping[str, str], ttl_ms: Optional[int] = None) -> None:
        ttl_ms = validate_ttl(ttl_ms)
        checked = {k: validate_value(v, self.max_value_bytes) for k, v in items.items()}
        if checked:
            self._run(lambda b: self._mset(b, checked, ttl_ms), idempotent=True)

    def _mget(self, b: _Bound, keys: list[str]) -> list[Optional[str]]:
        """The ``MGET`` of checked, non-empty ``keys`` (a cluster splits it by slot)."""
        return b.client.mget(keys)

    def _mset(self, b: _Bound, items: dict[str, str], ttl_ms: Optional[int]) -> None:
        """Write checked, non-empty ``items`` atomically, each with ``ttl_ms`` (a cluster splits it by slot)."""
        if ttl_ms is None:
            b.client.mset(items)
            return
        self._set_with_ttl(b, list(items), items, ttl_ms)

    @staticmethod
    def _set_with_ttl(b: _Bound, keys: list[str], items: Mapping[str, str], ttl_ms: int) -> None:
        """Write ``keys`` (of one slot) from ``items``, each with ``ttl_ms``, atomically: one key is
        a ``SET PX``, more are the mset-with-TTL script."""
        if len(keys) == 1:
            b.client.set(keys[0], items[keys[0]], px=ttl_ms)
            return
        b.mset_with_ttl(keys=keys, args=[items[k] for k in keys] + [ttl_ms])

    # -- atomic helpers --------------------------------------------------------------------------
    def set_if_absent(self, key: str, value: str, ttl_ms: Optional[int] = None) -> bool:
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        if self._waits_for(key):
            return bool(self.execute([Op("set_if_absent", (key, value, ttl_ms))])[0])
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
        if self._waits_for(key):
            return bool(self.execute([Op("compare_and_delete", (key, expected))])[0])
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

    # -- compound operations ----------------------------------------------------------------------
    def index_add_each(self, adds: Mapping[str, Mapping[str, float]]) -> None:
        if adds:
            self.execute([Op("index_add_each", (dict(adds),))])

    def index_add_capped(self, key: str, members: Mapping[str, float], max_size: int,
                         record_prefix: str, watermark: Optional[str] = None) -> list[str]:
        (result,) = self.execute([Op("index_add_capped", (key, members, max_size, record_prefix, watermark))])
        return result

    # -- watermarks (one script each) -------------------------------------------------------------
    def watermark_lower(self, key: str, score: float) -> None:
        self._run(lambda b: b.watermark_lower(keys=[key], args=[repr(float(score))]), idempotent=True)

    def watermark_begin(self, key: str, upto: float) -> Optional[float]:
        start = self._run(lambda b: b.watermark_begin(keys=[key], args=[repr(float(upto))]), idempotent=True)
        return None if start is None else float(start)

    def watermark_end(self, key: str, upto: float) -> Optional[float]:
        through = self._run(lambda b: b.watermark_end(keys=[key], args=[repr(float(upto))]), idempotent=True)
        return None if through is None else float(through)

    def guarded_reserve(self, guard: CounterGuard, key: str, value: str, ttl_ms: Optional[int] = None,
                        counter: Optional[Store] = None) -> tuple[int, bool]:
        if not self.cross_slot_scripts or counter not in (None, self):
            return super().guarded_reserve(guard, key, value, ttl_ms, counter)
        (result,) = self.execute([Op("guarded_reserve", (guard, key, value, ttl_ms))])
        return result

    def compare_and_set_then_claim(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int],
                                   claim: Claim, other: Optional[Store] = None) -> tuple[bool, bool]:
        if not self.cross_slot_scripts or other not in (None, self):
            return super().compare_and_set_then_claim(key, expected, value, ttl_ms, claim, other)
        op = Op("compare_and_set_then_claim", (key, expected, value, ttl_ms, claim))
        if self._waits_for(claim.key):
            return self.execute([op])[0]
        keys, args = self._then_claim_script_args(key, expected, value, ttl_ms, claim)
        reply = self._run(lambda b: b.compare_and_set_then_claim(keys=keys, args=args), idempotent=False)
        return reply[0] == 1, reply[1] == 1

    def _then_claim_script_args(self, key: str, expected: Optional[str], value: str, ttl_ms: Optional[int],
                                claim: Claim) -> tuple[list[str], list[Any]]:
        """``_COMPARE_AND_SET_THEN_CLAIM``'s keys and arguments, checked."""
        ttl_ms = validate_ttl(ttl_ms)
        value = validate_value(value, self.max_value_bytes)
        claimed = validate_value(claim.expected, self.max_value_bytes)
        if expected is not None and not isinstance(expected, str):
            raise TypeError(f"expected is a serialized string or None, got {type(expected).__name__}")
        argv = ["0" if expected is None else "1", expected or "", value, _ttl_arg(ttl_ms), claimed, str(claim.member)]
        return [key, claim.key, claim.index_key], argv

    def execute(self, ops: Sequence[Op]) -> list[Any]:
        """Run ``ops`` in order in one pipeline and return their results. Every argument is checked
        before anything is sent. Retried (as a whole) only when every operation is idempotent; a server
        error in any of them raises like the operation would alone, after the others ran."""
        queued = [self._queued(op) for op in ops]
        if not queued:
            return []

        wait = self.replica_wait if self.replica_wait is not None and self.replica_wait.waits_for(ops) else None

        def run(b: _Bound) -> list[Any]:
            pipe = self._pipeline(b, ops, shared=wait is None)
            for item in queued:
                pipe.execute_command(*item.command)
            if wait is not None:
                pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
            replies = pipe.execute(raise_on_error=False)
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
            if wait is not None:
                wait.settle(b.client, ops, replies, int(replies.pop()))
            return replies

        replies = self._run(run, idempotent=all(item.idempotent for item in queued))
        results = [item.convert(reply) for item, reply in zip(queued, replies)]
        for index, op in enumerate(ops):
            if op.name == "index_add_capped":
                added, trimmed = results[index]
                if trimmed:
                    self.delete(*(op.args[3] + escape_id(m) for m in trimmed))
                results[index] = added
        return results

    def _pipeline(self, b: _Bound, ops: Sequence[Op], shared: bool = True) -> ConnectionPipeline:
        """A pipeline (one connection, no ``MULTI``) for ``ops``; on the shared connection where
        there is one, unless ``shared`` is false (``WAIT`` must not hold the others up)."""
        assert b.connections is not None
        return ConnectionPipeline(b.connections, shared=shared)

    def _waits_for(self, key: str) -> bool:
        return self.replica_wait is not None and self.replica_wait.covers(key)

    def _queued(self, op: Op) -> _Queued:
        """Check ``op``'s arguments; its command and how to read the raw reply."""
        name, args = op.name, op.args
        if name == "get":
            (key,) = args
            return _Queued(("GET", key), _same, True)
        if name == "mget":
            return _Queued(("MGET", *args[0]), _same, True)
        if name == "set":
            key, value, ttl_ms = _pad(args, 3)
            ttl_ms = validate_ttl(ttl_ms)
            value = validate_value(value, self.max_value_bytes)
            return _Queued(("SET", key, value, *_px(ttl_ms)), _nothing, True)
        if name == "mset":
            items, ttl_ms = _pad(args, 2)
            ttl_ms = validate_ttl(ttl_ms)
            checked = {k: validate_value(v, self.max_value_bytes) for k, v in items.items()}
            if ttl_ms is None:
                return _Queued(("MSET", *(part for item in checked.items() for part in item)), _nothing, True)
            if len(checked) == 1:
                ((key, value),) = checked.items()
                return _Queued(("SET", key, value, "PX", ttl_ms), _nothing, True)
            return _Queued(("EVAL", _MSET_WITH_TTL, len(checked), *checked, *checked.values(), ttl_ms),
                           _nothing, True)
        if name == "delete":
            return _Queued(("DEL", *args), _same, True)
        if name == "set_if_absent":
            key, value, ttl_ms = _pad(args, 3)
            ttl_ms = validate_ttl(ttl_ms)
            value = validate_value(value, self.max_value_bytes)
            return _Queued(("SET", key, value, "NX", *_px(ttl_ms)), _is_ok, False)
        if name == "compare_and_set":
            key, expected, value, ttl_ms = _pad(args, 4)
            ttl_ms = validate_ttl(ttl_ms)
            value = validate_value(value, self.max_value_bytes)
            argv = ["0" if expected is None else "1", expected or "", value, _ttl_arg(ttl_ms)]
            return _Queued(("EVAL", _COMPARE_AND_SET, 1, key, *argv), _is_one, False)
        if name == "compare_and_delete":
            key, expected = args
            expected = validate_value(expected, self.max_value_bytes)
            return _Queued(("EVAL", _DELETE_IF_EQUAL, 1, key, expected), _is_one, False)
        if name == "incr":
            key, amount, ttl_ms = _pad(args, 3)
            ttl_ms = validate_ttl(ttl_ms)
            amount = _check_amount(1 if amount is None else amount)
            if ttl_ms is None:
                return _Queued(("INCRBY", key, amount), int, False)
            return _Queued(("EVAL", _INCR_WITH_TTL, 1, key, amount, ttl_ms), int, False)
        if name == "ttl_ms":
            (key,) = args
            return _Queued(("PTTL", key), lambda r: None if r < 0 else max(1, r), True)
        if name == "index_add":
            key, members = args
            pairs = [part for m, s in members.items() for part in (repr(float(s)), str(m))]
            return _Queued(("ZADD", key, *pairs) if pairs else ("EXISTS", key), _nothing, True)
        if name == "index_remove":
            key, members = args
            names = [str(m) for m in members]
            return _Queued(("ZREM", key, *names) if names else ("EXISTS", key),
                           _same if names else lambda _: 0, True)
        if name == "index_count":
            (key,) = args
            return _Queued(("ZCARD", key), int, True)
        if name == "index_range":
            key, limit, newest_first, min_score, max_score = _pad(args, 5)
            limit = validate_limit(limit)
            newest_first = True if newest_first is None else newest_first
            lo = "-inf" if min_score is None else repr(float(min_score))
            hi = "+inf" if max_score is None else repr(float(max_score))
            bounds = (hi, lo) if newest_first else (lo, hi)
            window = () if limit is None else ("LIMIT", 0, limit)
            command = ("ZREVRANGEBYSCORE" if newest_first else "ZRANGEBYSCORE", key, *bounds, "WITHSCORES", *window)
            return _Queued(command, lambda r: [] if limit == 0 else _score_pairs(r), True)
        if name == "index_trim":
            key, max_size = args
            max_size = _check_max_size(max_size)
            return _Queued(("EVAL", _INDEX_TRIM, 1, key, max_size), list, False)
        if name == "index_add_each":
            (adds,) = args
            argv = []
            for members in adds.values():
                argv.append(len(members))
                for member, score in members.items():
                    argv += [str(member), repr(float(score))]
            return _Queued(("EVAL", _INDEX_ADD_EACH, len(adds), *adds, *argv) if adds else ("ECHO", "0"),
                           _nothing, True)
        if name == "index_add_capped":
            key, members, max_size, record_prefix, watermark = _pad(args, 5)
            max_size = _check_max_size(max_size)
            argv: list[Any] = [max_size, record_prefix]
            for member, score in members.items():
                argv += [str(member), repr(float(score))]
            script = (_INDEX_ADD_CAPPED, 1, key) if watermark is None else (_INDEX_ADD_CAPPED_WATERMARKED, 2, key,
                                                                             watermark)
            return _Queued(("EVAL", *script, *argv), lambda r: (list(r[0]), list(r[1])), True)
        if name == "guarded_reserve":
            guard, key, value, ttl_ms = _pad(args, 4)
            ttl_ms = validate_ttl(ttl_ms)
            counter_ttl = validate_ttl(guard.ttl_ms)
            value = validate_value(value, self.max_value_bytes)
            argv = [_check_amount(guard.amount), _ttl_arg(counter_ttl), guard.limit, value, _ttl_arg(ttl_ms)]
            return _Queued(("EVAL", _GUARDED_RESERVE, 2, guard.key, key, *argv),
                           lambda r: (int(r[0]), r[1] == 1), False)
        if name == "compare_and_set_then_claim":
            keys, argv = self._then_claim_script_args(*args)
            return _Queued(("EVAL", _COMPARE_AND_SET_THEN_CLAIM, 3, *keys, *argv), lambda r: (r[0] == 1, r[1] == 1),
                           False)
        raise ValueError(f"{name} cannot be pipelined")  # not in PIPELINE_OPS

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
        bound = self._bound
        if bound is not None and bound.pid == os.getpid():
            # A connection adopts the server's epoch when it opens. Those this store opened before the
            # marker was known did not, and the periodic check may come after a loss, which would then
            # look like a first start: adopt it now where the server answers.
            try:
                self.check_data_loss()
            except StoreError:
                pass

    def check_data_loss(self) -> bool:
        """Look at the marker now; ``True`` when a loss was noticed. While writes were refused lately,
        also rewrite the marker: once that succeeds the server takes writes again (``degraded`` ends).
        Raises ``StoreUnavailable``."""
        key = self._marker_key
        if key is None:
            return False
        lost = self._run(lambda b: self._inspect_marker(key, b.client.execute_command), idempotent=False)
        if self._health.writes_refused_at is not None and self._epoch is not None:
            epoch = self._epoch
            self._run(lambda b: b.client.set(key, epoch, xx=True), idempotent=True)
            self._health.writes_refused_at = None
        return lost

    def _on_connect(self, connection: Any) -> None:
        """redis-py's hook for every new connection: the usual handshake, then the marker. The first
        command after a loss fails (``ConnectionError``), so it is not decided on the emptied server:
        also on a connection whose own look found the marker already replaced by another
        connection's, which noticed the loss while this one was connecting."""
        losses = self._health.data_losses
        connection.on_connect()
        key = self._marker_key
        if key is None:
            return

        def execute(*args: Any) -> Any:
            connection.send_command(*args)
            return connection.read_response()

        if self._inspect_marker(key, execute) or self._health.data_losses != losses:
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
            if bound.connections is not None:
                bound.connections.close()
            bound.client.close()


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, _TRANSIENT)
