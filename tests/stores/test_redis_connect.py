"""Clients from one URL: the kind of client, explicit timeouts with redis-py retries off, and a
Sentinel pool that re-asks where the primary is."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from relay.stores.base import Op
from relay.stores.redis import RedisStore
from relay.stores.redis_connect import (
    ClientOptions,
    FollowingSentinelPool,
    GeventSocketReads,
    ReadinessParser,
    _buffers_decrypted,
    SentinelMasterClient,
    connect,
    connect_node,
    driver_info,
    serves_primary,
)
from tests.support.rediscluster import LocalRedisCluster
from tests.support.redisproc import RedisServer

OPTIONS = ClientOptions(socket_timeout_s=0.3, connect_timeout_s=0.2, max_connections=7)


class FakeSentinels:
    """Stands in for ``redis.sentinel.Sentinel``: answers where the primary is, counting the questions."""

    def __init__(self) -> None:
        self.primary = ("10.0.0.1", 6379)
        self.asked = 0

    def discover_master(self, service_name: str) -> tuple[str, int]:
        self.asked += 1
        return self.primary


def test_a_server_url_gives_a_plain_client_with_our_timeouts() -> None:
    client = connect("redis://127.0.0.1:1/3", OPTIONS)
    kwargs = client.connection_pool.connection_kwargs
    assert type(client) is redis.Redis
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["db"]) == (0.3, 0.2, 3)
    assert kwargs["retry"].get_retries() == 0 and kwargs["decode_responses"] is True
    assert client.connection_pool.max_connections == 7


def test_a_unix_socket_url_gives_a_client_the_store_runs_on(unix_redis_server: RedisServer) -> None:
    """``unix://`` is a documented ``REDIS_URL``; redis-py's connection for it takes no TCP options."""
    store = RedisStore(unix_redis_server.unix_url, breaker=None)
    try:
        assert store._client().connection_pool.connection_class is redis.UnixDomainSocketConnection
        store.set("t:unix", "v")
        assert store.execute([Op("get", ("t:unix",)), Op("index_add", ("t:idx", {"m": 1.0}))]) == ["v", None]
        assert unix_redis_server.client().get("t:unix") == "v"
    finally:
        store.close()


def test_every_connection_reports_one_driver_info_looked_up_once(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``CLIENT SETINFO`` sends (redis-server 7.2 and later list it in ``CLIENT LIST``)."""
    lookups = []
    real = redis.utils.get_lib_version
    monkeypatch.setattr(redis.utils, "get_lib_version", lambda: lookups.append(1) or real())
    driver_info.cache_clear()
    clients = [connect(redis_server.url, OPTIONS),
               connect_node(redis_server.url, "127.0.0.1", redis_server.port, OPTIONS)]
    try:
        connections = [client.connection_pool.get_connection() for client in clients for _ in range(3)]
        for connection in connections:
            connection.connect()
        shared = driver_info()
    finally:
        for client in clients:
            client.close()
        driver_info.cache_clear()

    assert len(lookups) == 1
    assert all(connection.driver_info is shared for connection in connections)
    assert (shared.formatted_name, shared.lib_version) == ("redis-py", real())


def test_a_sentinel_url_gives_the_primary_s_client_through_a_following_pool() -> None:
    client = connect("redis+sentinel://u:pw@127.0.0.1:1,127.0.0.1:2/mymaster/2?sentinel_password=sp", OPTIONS)
    pool = client.connection_pool
    assert isinstance(client, SentinelMasterClient) and isinstance(pool, FollowingSentinelPool)
    assert pool.service_name == "mymaster" and pool.max_connections == 7
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == (2, "u", "pw", 0.3)
    assert kwargs["retry"].get_retries() == 0
    sentinels = pool.sentinel_manager.sentinels
    assert len(sentinels) == 2
    sentinel_kwargs = sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["password"] == "sp" and sentinel_kwargs["retry"].get_retries() == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()  # no sentinel listens there: no primary to be found
    client.close()


def test_a_cluster_url_gives_a_cluster_client(redis_cluster: LocalRedisCluster) -> None:
    client = connect(redis_cluster.url, OPTIONS)
    try:
        assert isinstance(client, RedisCluster)
        assert client.retry.get_retries() == 0
        assert len(client.get_primaries()) == 3
    finally:
        client.close()
    with pytest.raises(redis.ConnectionError):
        connect("redis+cluster://127.0.0.1:1", OPTIONS)


def test_the_pool_re_asks_the_sentinels_at_most_once_per_interval() -> None:
    sentinels = FakeSentinels()
    pool = FollowingSentinelPool("mymaster", sentinels, follow_interval_s=0.5)  # type: ignore[arg-type]
    pool.follow(force=True)
    assert (sentinels.asked, pool.master_address) == (1, ("10.0.0.1", 6379))
    pool.follow()
    assert sentinels.asked == 1  # asked less than the interval ago
    sentinels.primary = ("10.0.0.2", 6379)
    pool._followed_at -= 0.6  # the interval has passed
    pool.follow()
    assert (sentinels.asked, pool.master_address) == (2, ("10.0.0.2", 6379))


def test_a_subscription_on_a_demoted_primary_is_recognised() -> None:
    sentinels = FakeSentinels()
    pool = FollowingSentinelPool("mymaster", sentinels, follow_interval_s=0.0)  # type: ignore[arg-type]
    pubsub = SimpleNamespace(connection_pool=pool, connection=SimpleNamespace(host="10.0.0.1", port=6379))
    assert serves_primary(pubsub) is True
    sentinels.primary = ("10.0.0.2", 6379)
    assert serves_primary(pubsub) is False
    assert serves_primary(SimpleNamespace(connection_pool=None, connection=None)) is True


def test_the_readiness_check_sees_unread_replies_and_a_closed_server(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, OPTIONS)
    connection = client.connection_pool.get_connection()
    try:
        assert isinstance(connection._parser, ReadinessParser)
        assert connection.can_read() is False
        connection.send_command("PING")
        deadline = time.monotonic() + 2
        while not connection.can_read() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert connection.can_read() is True
        assert connection.read_response() == "PONG"
        assert connection.can_read() is False

        redis_server.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        while time.monotonic() < deadline + 2:
            try:
                if connection.can_read():
                    break
            except redis.ConnectionError:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("a closed connection was not noticed")
    finally:
        client.connection_pool.release(connection)
        client.close()


def test_only_a_tls_socket_is_taken_to_hold_decrypted_bytes_above_the_os_socket() -> None:
    import socket
    import ssl

    import gevent.socket
    import gevent.ssl

    assert _buffers_decrypted(ssl.SSLSocket) and _buffers_decrypted(gevent.ssl.SSLSocket)
    assert not _buffers_decrypted(socket.socket) and not _buffers_decrypted(gevent.socket.socket)


# -- a pipeline's replies read in one call ----------------------------------------------------------
#: Replies of every RESP2 and RESP3 kind the store meets, error replies and a push notification
#: (client tracking's invalidation, which ``read_response`` handles and skips) among them.
REPLIES = (b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n$1\r\na\r\n,2.5\r\n-ERR wrong number\r\n"
           b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n%1\r\n+k\r\n:1\r\n_\r\n"
           b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n*0\r\n$0\r\n\r\n")
REPLY_COUNT = 11


def _socketpair(kind: str) -> tuple[Any, Any]:
    """Two connected sockets: the standard library's, or gevent's (as gunicorn's worker makes them,
    read through ``GeventSocketReads``)."""
    import socket

    if kind == "gevent":
        import gevent.socket

        return gevent.socket.socketpair()
    return socket.socketpair()


@pytest.fixture
def connected_parser() -> Iterator[Callable[..., ReadinessParser]]:
    """``connected_parser(kind, data=b"", read_size=65536, close=False, timeout_s=0.2)``: a
    ``ReadinessParser`` connected, as redis-py connects it, to a socket of ``kind`` (``_socketpair``)
    that holds ``data`` (then end of file, with ``close``); the other end is the parser's ``peer``."""
    held: list[Any] = []

    def make(kind: str, data: bytes = b"", read_size: int = 65536, close: bool = False,
             timeout_s: float = 0.2) -> ReadinessParser:
        ours, theirs = _socketpair(kind)
        ours.settimeout(timeout_s)
        theirs.sendall(data)
        if close:
            theirs.close()
        connection = redis.Connection(socket_timeout=timeout_s, decode_responses=True)
        connection._sock = ours
        parser = ReadinessParser(socket_read_size=read_size)
        parser.on_connect(connection)
        parser.peer = theirs  # type: ignore[attr-defined]
        held.append((connection, ours, theirs))  # the connection closes its socket once collected
        return parser

    yield make
    for _, ours, theirs in held:
        ours.close()
        theirs.close()


@pytest.fixture(params=["socket", "gevent"])
def parser_reading(request: pytest.FixtureRequest,
                   connected_parser: Callable[..., ReadinessParser]) -> Callable[..., ReadinessParser]:
    """``parser_reading(data, read_size=65536, close=True)``: ``connected_parser`` once per socket kind."""
    def make(data: bytes, read_size: int = 65536, close: bool = True) -> ReadinessParser:
        return connected_parser(request.param, data, read_size, close)

    return make


def _one_by_one(parser: ReadinessParser, count: int) -> list[object]:
    replies: list[object] = []
    for _ in range(count):
        try:
            replies.append(parser.read_response())
        except redis.ResponseError as error:
            replies.append(error)
    return replies


def _comparable(replies: list[object]) -> list[object]:
    return [(type(r).__name__, str(r)) if isinstance(r, Exception) else r for r in replies]


@pytest.mark.parametrize("read_size", [1, 3, 7, 65536])
def test_replies_read_together_are_those_read_one_by_one(parser_reading: Callable[..., ReadinessParser],
                                                         read_size: int) -> None:
    together = parser_reading(REPLIES, read_size).read_replies(REPLY_COUNT)
    one_by_one = _one_by_one(parser_reading(REPLIES, read_size), REPLY_COUNT)
    assert _comparable(together) == _comparable(one_by_one)
    assert together[:4] == ["OK", 42, "hello", None] and together[-2:] == [[], ""]
    assert together[4] == ["a", 2.5] and together[6] == {"k": 1} and together[7] is None
    assert type(together[5]) is redis.ResponseError and "wrong number" in str(together[5])
    assert type(together[8]) is redis.ResponseError and "WRONGTYPE" in str(together[8])


def test_a_reply_that_means_the_server_cannot_serve_is_raised(parser_reading: Callable[..., ReadinessParser]) -> None:
    parser = parser_reading(b"+OK\r\n-LOADING Redis is loading the dataset in memory\r\n+OK\r\n")
    with pytest.raises(redis.BusyLoadingError):
        parser.read_replies(3)


def test_the_server_closing_mid_reply_is_a_connection_error(parser_reading: Callable[..., ReadinessParser]) -> None:
    parser = parser_reading(b"+OK\r\n$10\r\nhal")
    with pytest.raises(redis.ConnectionError, match="Connection closed by server"):
        parser.read_replies(2)


def test_a_server_that_does_not_answer_in_time_is_a_timeout(parser_reading: Callable[..., ReadinessParser]) -> None:
    parser = parser_reading(b"+OK\r\n", close=False)
    with pytest.raises(redis.TimeoutError):
        parser.read_replies(2)


def test_reading_a_disconnected_parser_is_a_connection_error(parser_reading: Callable[..., ReadinessParser]) -> None:
    parser = parser_reading(b"+OK\r\n")
    parser.on_disconnect()
    with pytest.raises(redis.ConnectionError):
        parser.read_replies(1)
    with pytest.raises(redis.ConnectionError):
        parser.can_read()


# -- replies waited for on a gevent socket ---------------------------------------------------------
@pytest.fixture
def gevent_parser(connected_parser: Callable[..., ReadinessParser]) -> Callable[[float], ReadinessParser]:
    """``gevent_parser(timeout_s)``: a ``ReadinessParser`` on a gevent socket with nothing to read
    yet; its ``peer`` writes the replies."""
    def make(timeout_s: float) -> ReadinessParser:
        parser = connected_parser("gevent", timeout_s=timeout_s)
        assert isinstance(parser._recv_into.__self__, GeventSocketReads)  # type: ignore[union-attr]
        return parser

    return make


def test_only_a_plain_gevent_socket_is_read_through_gevent_socket_reads() -> None:
    """TLS sockets, which may hold decrypted bytes above the OS socket, and the standard library's
    keep their own ``recv_into``."""
    import socket
    import ssl

    import gevent.socket
    import gevent.ssl

    plain = gevent.socket.socket()
    tls = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(
        gevent.socket.socket(), server_hostname="localhost", do_handshake_on_connect=False)
    stdlib = socket.socket()
    try:
        assert GeventSocketReads.serves(plain)
        assert not GeventSocketReads.serves(tls) and not GeventSocketReads.serves(stdlib)
    finally:
        for sock in (plain, tls, stdlib):
            sock.close()


def _send_slowly(peer: Any, pieces: list[bytes], pause_s: float) -> None:
    import gevent

    for piece in pieces:
        gevent.sleep(pause_s)
        peer.sendall(piece)


def test_each_wait_for_a_reply_may_last_the_socket_timeout(
        gevent_parser: Callable[[float], ReadinessParser]) -> None:
    """Four pieces, 0.3 s apart under a 0.6 s timeout: 1.2 s in all, which no single timer allows."""
    import gevent

    parser = gevent_parser(0.6)
    writer = gevent.spawn(_send_slowly, parser.peer, [b"+O", b"K\r\n:", b"4", b"2\r\n"], 0.3)  # type: ignore[attr-defined]
    assert parser.read_replies(2) == ["OK", 42]
    writer.get(timeout=5)


def test_a_reply_read_leaves_no_timer_running(gevent_parser: Callable[[float], ReadinessParser]) -> None:
    import gevent

    parser = gevent_parser(0.1)
    gevent.spawn(_send_slowly, parser.peer, [b"+OK\r\n"], 0.02)  # type: ignore[attr-defined]
    assert parser.read_replies(1) == ["OK"]
    gevent.sleep(0.3)  # a timer left running would raise its timeout here
    gevent.spawn(_send_slowly, parser.peer, [b"+again\r\n"], 0.02)  # type: ignore[attr-defined]
    assert parser.read_replies(1) == ["again"]


def test_waiting_for_replies_makes_no_gevent_timeout(gevent_parser: Callable[[float], ReadinessParser],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``GeventSocketReads`` is for: gevent's own ``recv_into`` makes one per wait."""
    import gevent

    made: list[object] = []
    original = gevent.Timeout.__init__

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    parser = gevent_parser(1.0)
    monkeypatch.setattr(gevent.Timeout, "__init__", counted)
    writer = gevent.spawn(_send_slowly, parser.peer, [b"+OK\r\n", b":1\r\n"], 0.02)  # type: ignore[attr-defined]
    assert parser.read_replies(2) == ["OK", 1]
    writer.join()
    assert made == []
