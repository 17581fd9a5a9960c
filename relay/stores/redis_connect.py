"""Redis clients from one URL: a single server, a primary managed by Sentinel, or a Redis Cluster.

``Settings.redis_url`` is canonical (``config/redis_target.py`` has the URL forms). ``connect`` makes
the client for it with the same explicit timeouts everywhere and redis-py's own retries off (the
store retries idempotent operations itself, ``middleware/retry.py``):

* **single** (``redis://``, ``rediss://``, ``unix://``): ``redis.Redis.from_url``;
* **sentinel** (``redis+sentinel://``): redis-py's ``Sentinel`` and ``master_for``. redis-py asks the
  sentinels for the primary only when it opens a connection, and a sentinel reconfigures a demoted
  primary only when it next polls it (every 10 s), so pooled connections could keep writing to the
  old primary that long after a failover. ``FollowingSentinelPool`` asks again at most every
  ``follow_interval_s`` when a connection is checked out; when the primary moved, idle connections
  are closed at once and busy ones when they are returned, so the process follows within about
  that interval;
* **cluster** (``redis+cluster://``): redis-py's ``RedisCluster``; failing to reach any startup node
  raises ``redis.ConnectionError`` like the other kinds.

Every kind shares one ``DriverInfo`` (``driver_info``): what a connection reports with
``CLIENT SETINFO``, redis-py's name and version, looked up once per process.

``node_client`` gives the client of the node that owns a key (the client itself outside a cluster),
for what must run on one connection of that node (``WAIT`` after a write, sharded pub/sub).
"""
from __future__ import annotations

import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Union

import redis
from redis._parsers import _HiredisParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.driver_info import DriverInfo
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from config.redis_target import CLUSTER, SENTINEL, RedisTarget, parse_redis_url

Client = Union[redis.Redis, RedisCluster]
#: How often a Sentinel-managed pool re-asks the sentinels where the primary is.
FOLLOW_INTERVAL_S = 0.5


class ReadinessParser(_HiredisParser):
    """hiredis's parser with a cheaper "is anything unread?" check.

    redis-py asks it at every connection checkout (``can_read()``, no timeout), and so do the
    store's pipelines (``relay.stores.redis_pipeline.Connections``). Under gunicorn's gevent worker
    ``select.poll`` is gevent's, which goes through the event loop even for a zero timeout (about a
    tenth of the worker's py-spy samples in Redis mode). A zero-timeout check cannot block, so it
    asks the operating system's ``poll``, through one poll object per connection made when it
    connects; a check with a timeout takes the cooperative path as before. TLS sockets, which may
    hold decrypted bytes above the OS socket, always take redis-py's path.

    It also reads a pipeline's replies in one call (``read_replies``), from a gevent socket through
    ``GeventSocketReads``.
    """

    #: The operating system's poll object watching this connection's socket; ``None`` while
    #: disconnected and on TLS.
    _unread: Any = None
    #: ``recv_into`` of this connection's socket, as ``read_replies`` reads it; ``None`` while
    #: disconnected.
    _recv_into: Optional[Callable[[Any], int]] = None

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        sock = self._sock
        if not _buffers_decrypted(type(sock)):
            unread = _os_poll()()
            unread.register(sock, select.POLLIN)
            self._unread = unread
        if GeventSocketReads.serves(sock):
            self._recv_into = GeventSocketReads(sock, connection.socket_timeout).recv_into
        else:
            self._recv_into = sock.recv_into

    def on_disconnect(self) -> None:
        super().on_disconnect()
        self._unread = None
        self._recv_into = None

    def can_read(self, timeout: float = 0) -> bool:
        unread, reader = self._unread, self._reader
        if timeout == 0 and unread is not None and reader is not None and not reader.has_data() \
                and not unread.poll(0):
            return False
        return super().can_read(timeout)

    def read_replies(self, count: int) -> list[Any]:
        """The next ``count`` replies, as ``count`` calls of ``read_response`` would give them, except
        that an error reply (``redis.ResponseError``) is returned in its place rather than raised,
        and a push notification (RESP3) is handled as ``read_response`` handles it.

        A pipeline reads one reply per command; through ``Connection.read_response`` each costs two
        method layers, a host string and a type check per reply, more than hiredis's parse. Errors
        are raised as ``read_response`` raises them: a reply that is a ``redis.ConnectionError``
        (``LOADING``, too many clients), ``redis.TimeoutError`` on a socket timeout, and
        ``redis.ConnectionError`` when the server closed the connection or the socket failed. The
        caller disconnects the connection on any of them, as ``read_response`` does."""
        recv_into, reader = self._recv_into, self._reader
        if recv_into is None or reader is None:
            raise redis.ConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
        buffer, push_type = self._buffer, self._hiredis_PushNotificationType
        replies: list[Any] = []
        while len(replies) < count:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                try:
                    size = recv_into(buffer)
                except socket.timeout:
                    raise redis.TimeoutError("Timeout reading from socket") from None
                except OSError as error:
                    raise read_failed(error) from None
                if size == 0:
                    raise redis.ConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                reader.feed(buffer, 0, size)
                continue
            if push_type is not None and isinstance(reply, push_type):
                self.handle_push_response(reply)
                continue
            refused = connection_error_in(reply)
            if refused is not None:
                raise refused
            replies.append(reply)
        return replies


def connection_error_in(reply: Any) -> Optional[redis.ConnectionError]:
    """The ``redis.ConnectionError`` a reply stands for (``LOADING``, too many clients), which
    ``read_response`` raises rather than returns; ``None`` for any other reply."""
    if isinstance(reply, redis.ConnectionError):
        return reply
    if type(reply) is list and reply and isinstance(reply[0], redis.ConnectionError):
        return reply[0]
    return None


def read_failed(error: OSError) -> redis.ConnectionError:
    """A failed socket read, as redis-py reports it."""
    return redis.ConnectionError(f"Error while reading from socket: {error.args}")


def write_failed(error: OSError) -> redis.ConnectionError:
    """A failed socket write, as redis-py reports it."""
    errno, message = error.args if len(error.args) == 2 else ("UNKNOWN", error.args[0] if error.args else "")
    return redis.ConnectionError(f"Error {errno} while writing to socket. {message}.")


class GeventSocketReads:
    """``recv_into`` of a plain gevent socket, whose waits share one event-loop timer.

    gevent's ``recv_into`` makes a new ``gevent.Timeout`` (a Python object and an event-loop timer)
    for every wait on a socket with a timeout, and a Redis round trip waits for its replies once or
    more: some 3 % of a Redis-mode callback's instructions (callgrind). Here the timer is made once,
    when the connection connects, and re-armed for the full timeout before each wait with ``again``
    (a ``gevent.Timeout`` started again would run for what was left of its last run). The rest is
    what gevent's ``recv_into`` does: read the OS socket, which gevent keeps non-blocking, and wait
    on the socket's read watcher while it has nothing. Each wait may last the socket timeout, then
    ``socket.timeout`` is raised, as there.
    """

    def __init__(self, sock: Any, timeout_s: Optional[float]) -> None:
        from gevent import getcurrent

        self._current_greenlet = getcurrent
        self._os_socket = sock._sock
        self._readable = sock._read_event
        self._hub = sock.hub
        #: Its ``after`` and ``repeat`` are both the timeout: libev's ``again`` arms a timer for its
        #: repeat value, libuv's for its after value. It is stopped before it could repeat.
        self._timer = sock.hub.loop.timer(timeout_s, timeout_s) if timeout_s else None

    @staticmethod
    def serves(sock: Any) -> bool:
        """Whether ``sock`` is a plain gevent socket (not TLS, whose bytes need decrypting)."""
        gevent_socket = sys.modules.get("gevent._socket3")
        return (gevent_socket is not None and type(sock) is gevent_socket.socket
                and all(hasattr(sock, name) for name in ("_sock", "_read_event", "hub")))

    def recv_into(self, buffer: Any) -> int:
        os_socket = self._os_socket
        try:
            return os_socket.recv_into(buffer)
        except BlockingIOError:
            pass
        timer = self._timer
        if timer is not None:
            timer.again(self._current_greenlet().throw, socket.timeout, "timed out")
        try:
            while True:
                self._hub.wait(self._readable)
                try:
                    return os_socket.recv_into(buffer)
                except BlockingIOError:
                    continue
        finally:
            if timer is not None:
                timer.stop()


@lru_cache(maxsize=None)
def _buffers_decrypted(socket_type: type) -> bool:
    """Sockets of this type may hold decrypted bytes above the OS socket (TLS: ``pending()``). Asked
    of the type: a gevent socket answers a failed lookup by trying the socket it wraps, building two
    ``AttributeError``s per check."""
    return hasattr(socket_type, "pending")


@lru_cache(maxsize=None)
def _os_poll() -> Callable[[], Any]:
    """The operating system's ``select.poll``, also once gevent has patched ``select``. Asked on first
    use: gunicorn's gevent worker patches before it loads the application."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey.get_original("select", "poll") if monkey is not None else select.poll


@dataclass(frozen=True)
class ClientOptions:
    """Connection settings shared by every kind of client."""

    socket_timeout_s: float
    connect_timeout_s: float
    max_connections: Optional[int] = None
    #: Seconds between PINGs on an idle connection before it is used (0 = never); not on a cluster.
    health_check_interval_s: int = 0
    keepalive: bool = False
    #: redis-py's ``redis_connect_func``: runs the handshake (``connection.on_connect()``) and more.
    on_connect: Optional[Callable[[Any], None]] = None
    follow_interval_s: float = FOLLOW_INTERVAL_S


class FollowingSentinelPool(SentinelConnectionPool):
    """A Sentinel pool that re-checks where the primary is, at most every ``follow_interval_s``."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, *, follow_interval_s: float,
                 **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.follow_interval_s = follow_interval_s
        self._follow_lock = threading.Lock()
        self._followed_at = time.monotonic()

    def follow(self, force: bool = False) -> None:
        """Ask the sentinels for the primary (unless asked less than ``follow_interval_s`` ago); when
        it moved, redis-py closes the idle connections. Sentinels that cannot answer change nothing."""
        if not force and time.monotonic() - self._followed_at < self.follow_interval_s:
            return
        if not self._follow_lock.acquire(blocking=False):
            return
        try:
            self._followed_at = time.monotonic()
            self.get_master_address()
        except redis.ConnectionError:
            pass
        finally:
            self._follow_lock.release()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.follow()
        return super().get_connection(*args, **kwargs)


class SentinelMasterClient(redis.Redis):
    """The primary's client; closing it also closes the connections to the sentinels."""

    def close(self) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        super().close()
        if manager is not None:
            manager.close()


@lru_cache(maxsize=1)
def driver_info() -> DriverInfo:
    """redis-py's name and version for ``CLIENT SETINFO``, made once.

    A pool made from a URL leaves each new connection to make its own, and redis-py then reads its
    version from the package metadata (``importlib.metadata``, about 0.6 ms): twenty agents'
    heartbeats arriving together opened sixteen connections at once on the callback benchmark, which
    put the relay's instructions per callback up by about 5 %, most of it in those lookups."""
    return DriverInfo()


def target_of(url: Union[str, RedisTarget]) -> RedisTarget:
    return url if isinstance(url, RedisTarget) else parse_redis_url(url)


def connect(url: Union[str, RedisTarget], options: ClientOptions) -> Client:
    """A client (``decode_responses=True``) for ``url``; raises ``redis.ConnectionError`` when a
    cluster cannot be reached to learn its slots."""
    target = target_of(url)
    common: dict[str, Any] = {
        "socket_timeout": options.socket_timeout_s,
        "socket_connect_timeout": options.connect_timeout_s,
        "socket_keepalive": options.keepalive,
        "decode_responses": True,
        "driver_info": driver_info(),
    }
    if options.max_connections is not None:
        common["max_connections"] = options.max_connections
    if options.on_connect is not None:
        common["redis_connect_func"] = options.on_connect
    if target.kind == CLUSTER:
        try:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                retry=Retry(NoBackoff(), 0), username=target.username, password=target.password,
                ssl=target.ssl, **common)
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"redis cluster unreachable: {exc}") from exc
    common["retry"] = Retry(NoBackoff(), 0)
    common["health_check_interval"] = options.health_check_interval_s
    common["parser_class"] = ReadinessParser
    if target.url.partition(":")[0].lower() == "unix":
        # TCP keepalive has no meaning on a Unix socket, and redis-py's connection for one refuses it.
        del common["socket_keepalive"]
    if target.kind == SENTINEL:
        sentinel = Sentinel(target.nodes, sentinel_kwargs={
            "socket_timeout": options.socket_timeout_s, "socket_connect_timeout": options.connect_timeout_s,
            "retry": Retry(NoBackoff(), 0), "decode_responses": True, "password": target.sentinel_password,
            "ssl": target.ssl})
        return sentinel.master_for(
            target.master, redis_class=SentinelMasterClient, connection_pool_class=FollowingSentinelPool,
            follow_interval_s=options.follow_interval_s, db=target.db, username=target.username,
            password=target.password, ssl=target.ssl, **common)
    return redis.Redis.from_url(target.url, **common)


def node_client_for(client: Client, key: str) -> redis.Redis:
    """The client of the node that serves ``key``: a cluster node's, or ``client`` itself."""
    if isinstance(client, RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(key))
    return client


def node_address_for(client: Client, key: str) -> Optional[tuple[str, int]]:
    """Host and port of the node that serves ``key`` on a cluster; ``None`` elsewhere."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key)
        return node.host, int(node.port)
    return None


def connect_node(url: Union[str, RedisTarget], host: str, port: int, options: ClientOptions) -> redis.Redis:
    """A plain client on one node of ``url``'s deployment, with its credentials and TLS."""
    target = target_of(url)
    return redis.Redis(
        host=host, port=port, username=target.username, password=target.password, ssl=target.ssl,
        socket_timeout=options.socket_timeout_s, socket_connect_timeout=options.connect_timeout_s,
        socket_keepalive=options.keepalive, retry=Retry(NoBackoff(), 0), decode_responses=True,
        health_check_interval=options.health_check_interval_s, driver_info=driver_info())


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def serves_primary(pubsub: Any) -> bool:
    """``False`` when ``pubsub``'s connection goes to a server the sentinels no longer name primary."""
    pool = getattr(pubsub, "connection_pool", None)
    connection = getattr(pubsub, "connection", None)
    if not isinstance(pool, FollowingSentinelPool) or connection is None:
        return True
    pool.follow()
    return pool.master_address in (None, (connection.host, connection.port))
