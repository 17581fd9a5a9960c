"""``ConnectionPipeline`` on a real redis-server: one round trip, replies in order, error replies
in place, and a connection that never goes back to the pool out of step with the server."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import redis

from relay.stores.base import Op
from relay.stores.redis import RedisStore
from relay.stores.redis_connect import ReadinessParser
from relay.stores.redis_pipeline import ConnectionPipeline, Connections, pack, send
from tests.support.redisproc import RedisServer


@pytest.fixture(params=["redis-py parser", "ReadinessParser"])
def client(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A client with redis-py's hiredis parser (replies read one ``read_response`` each) or with the
    store's (``ReadinessParser.read_replies``)."""
    extra = {"parser_class": ReadinessParser} if request.param == "ReadinessParser" else {}
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=0.2, **extra)
    yield client
    client.close()


def _checked_out(client: redis.Redis) -> int:
    return len(client.connection_pool._in_use_connections)


def test_replies_come_back_in_order_after_one_write(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    client.ping()  # the connection's handshake is done before counting
    writes = []
    for name in ("send", "sendall"):
        method = getattr(socket.socket, name)
        monkeypatch.setattr(socket.socket, name,
                            lambda self, data, *a, method=method: writes.append(bytes(data)) or method(self, data, *a))
    pipe = ConnectionPipeline(Connections(client.connection_pool))
    pipe.execute_command("SET", "a", "1")
    pipe.execute_command("INCRBY", "a", 2)
    pipe.execute_command("GET", "a")
    pipe.execute_command("GET", "missing")
    assert pipe.execute() == ["OK", 3, "3", None]
    assert len(writes) == 1
    assert pipe.execute() == []
    assert len(writes) == 1
    assert client.connection_pool._created_connections == 1 and _checked_out(client) == 1


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    connection = redis.Connection()
    commands = [
        ("SET", "relay:dev:audit:é", "x" * 10_000, "PX", 60_000),
        ("ZADD", b"index", 1.5, "m", -0.0, "n", 1e20, "o", 2**70, "p"),
        ("EVAL", "return 1", 0),
    ]
    assert b"".join(pack(connection, commands)) == b"".join(connection.pack_commands(commands))


def test_what_hiredis_cannot_pack_goes_through_redis_py(client: redis.Redis) -> None:
    connection = redis.Connection()
    assert pack(connection, [("CLIENT SETNAME", "relay")]) == connection.pack_commands([("CLIENT SETNAME", "relay")])
    assert pack(connection, [("GET", bytearray(b"k"))]) == connection.pack_commands([("GET", b"k")])
    with pytest.raises(redis.DataError):
        pack(connection, [("SET", "k", True)])
    pipe = ConnectionPipeline(Connections(client.connection_pool))
    pipe.execute_command("CLIENT SETNAME", "relay-test")
    pipe.execute_command("CLIENT GETNAME")
    assert pipe.execute() == ["OK", "relay-test"]


def test_an_error_reply_stays_in_its_place_and_the_connection_stays_in_step(client: redis.Redis) -> None:
    client.set("text", "not a number")
    pipe = ConnectionPipeline(Connections(client.connection_pool))
    pipe.execute_command("INCRBY", "text", 1)
    pipe.execute_command("SET", "b", "2")
    with pytest.raises(redis.ResponseError):
        pipe.execute()
    pipe.execute_command("INCRBY", "text", 1)
    pipe.execute_command("GET", "b")
    first, second = pipe.execute(raise_on_error=False)
    assert isinstance(first, redis.ResponseError) and second == "2"
    assert client.get("b") == "2"


def test_a_timeout_disconnects_the_connection_before_it_returns_to_the_pool(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    client.set("k", "v")
    pipe = ConnectionPipeline(Connections(client.connection_pool))
    redis_server.pause()
    try:
        pipe.execute_command("GET", "k")
        with pytest.raises(redis.TimeoutError):
            pipe.execute()
    finally:
        redis_server.resume()
    (connection,) = client.connection_pool._in_use_connections
    assert connection._sock is None
    pipe.execute_command("SET", "k", "w")
    pipe.execute_command("GET", "k")
    assert pipe.execute() == ["OK", "w"]


@pytest.mark.parametrize("protocol", [2, 3])
def test_store_results_do_not_depend_on_the_protocol(redis_server: RedisServer, protocol: int) -> None:
    store = RedisStore(lambda: redis.Redis.from_url(redis_server.url, decode_responses=True, protocol=protocol),
                       breaker=None)
    try:
        store.index_add("i", {"a": 1, "b": 2.5})
        results = store.execute([
            Op("index_range", ("i", 10)),
            Op("index_range", ("i", 1, False)),
            Op("set_if_absent", ("k", "v", 60_000)),
            Op("set_if_absent", ("k", "v")),
            Op("compare_and_set", ("k", "v", "w")),
            Op("incr", ("n", 2, 60_000)),
            Op("index_add_capped", ("i", {"c": 3}, 2, "rec:")),
        ])
    finally:
        store.close()
    assert results == [[("b", 2.5), ("a", 1.0)], [("a", 1.0)], True, False, True, 2, ["a"]]


def test_a_kept_connection_serves_round_trip_after_round_trip_and_closes_with_the_client(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = Connections(client.connection_pool)
    pipe = ConnectionPipeline(connections)
    pipe.execute_command("PING")
    assert pipe.execute() == ["PONG"]
    checkouts = []
    monkeypatch.setattr(client.connection_pool, "get_connection",
                        lambda *a, **k: checkouts.append(1) or pytest.fail("checked out again"))
    for n in range(5):
        pipe.execute_command("SET", "n", n)
        assert pipe.execute() == ["OK"]
    assert checkouts == []
    (connection,) = client.connection_pool._in_use_connections
    client.close()
    assert connection._sock is None


def test_a_kept_connection_is_renewed_after_a_server_restart_without_a_failed_call(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    pipe = ConnectionPipeline(Connections(client.connection_pool))
    pipe.execute_command("SET", "k", "1")
    assert pipe.execute() == ["OK"]
    redis_server.stop()
    redis_server.start()
    pipe.execute_command("SET", "k", "2")
    assert pipe.execute() == ["OK"]


def test_other_pools_get_every_connection_back(redis_server: RedisServer) -> None:
    class OtherPool(redis.ConnectionPool):
        pass

    pool = OtherPool.from_url(redis_server.url, decode_responses=True)
    pipe = ConnectionPipeline(Connections(pool))
    pipe.execute_command("PING")
    pipe.execute()
    assert len(pool._available_connections) == 1 and not pool._in_use_connections
    plain = redis.ConnectionPool.from_url(redis_server.url, decode_responses=True)
    pipe = ConnectionPipeline(Connections(plain, keep=False))
    pipe.execute_command("PING")
    pipe.execute()
    assert len(plain._available_connections) == 1 and not plain._in_use_connections
    pool.disconnect()
    plain.disconnect()


class FakeSocket:
    """Takes at most ``per_send`` bytes per ``send``, or fails with ``error``."""

    def __init__(self, per_send: int = 1 << 20, error: Optional[BaseException] = None) -> None:
        self.per_send, self.error = per_send, error
        self.received = b""
        self.calls: list[str] = []

    def send(self, data: bytes) -> int:
        self.calls.append("send")
        if self.error is not None:
            raise self.error
        self.received += bytes(data[:self.per_send])
        return min(len(data), self.per_send)

    def sendall(self, data: memoryview) -> None:
        self.calls.append("sendall")
        self.received += bytes(data)

    def close(self) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass


def _connection_on(sock: FakeSocket, **kwargs: Any) -> redis.Connection:
    connection = redis.Connection(**kwargs)
    connection._sock = sock
    return connection


def test_a_payload_the_socket_takes_at_once_is_one_send() -> None:
    sock = FakeSocket()
    send(_connection_on(sock), [b"*1\r\n$4\r\nPING\r\n"])
    assert sock.received == b"*1\r\n$4\r\nPING\r\n" and sock.calls == ["send"]


def test_what_one_send_leaves_goes_in_a_sendall() -> None:
    sock = FakeSocket(per_send=5)
    payload = b"".join(pack(redis.Connection(), [("SET", "k", "x" * 1000), ("GET", "k")]))
    send(_connection_on(sock), [payload])
    assert sock.received == payload and sock.calls == ["send", "sendall"]


@pytest.mark.parametrize("error, raised, message", [
    (socket.timeout("timed out"), redis.TimeoutError, "Timeout writing to socket"),
    (BrokenPipeError(32, "Broken pipe"), redis.ConnectionError, "Error 32 while writing to socket. Broken pipe."),
])
def test_a_failed_send_raises_as_redis_py_does_and_disconnects(error: BaseException, raised: type,
                                                               message: str) -> None:
    connection = _connection_on(FakeSocket(error=error))
    with pytest.raises(raised, match=message):
        send(connection, [b"*1\r\n$4\r\nPING\r\n"])
    assert connection._sock is None


def test_health_checks_and_chunked_payloads_keep_redis_py_s_send(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    monkeypatch.setattr(redis.Connection, "send_packed_command", lambda self, packed: sent.append(packed))
    send(_connection_on(FakeSocket(), health_check_interval=30), [b"a"])
    send(_connection_on(FakeSocket()), [b"a", b"b"])
    send(redis.Connection(), [b"a"])  # not connected yet: redis-py connects it
    assert sent == [[b"a"], [b"a", b"b"], [b"a"]]


def test_a_connection_class_that_sends_its_own_way_keeps_it() -> None:
    class Counting(redis.Connection):
        sends = 0

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            Counting.sends += 1
            super().send_packed_command(command, check_health)

    sock = FakeSocket()
    send(_connection_on(sock), [b"a"])
    counting = Counting()
    counting._sock = FakeSocket()
    send(counting, [b"b"])
    assert Counting.sends == 1 and counting._sock.received == b"b" and sock.received == b"a"


def test_replies_read_together_put_the_next_health_check_off_as_read_response_does(
        redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, parser_class=ReadinessParser,
                                  health_check_interval=30)
    try:
        pipe = ConnectionPipeline(Connections(client.connection_pool))
        pipe.execute_command("PING")
        assert pipe.execute() == ["PONG"]  # connects: the handshake's replies set it too
        time.sleep(0.05)
        pipe.execute_command("PING")
        before = time.monotonic()
        assert pipe.execute() == ["PONG"]
        (connection,) = client.connection_pool._in_use_connections
        assert before + 30 <= connection.next_health_check <= time.monotonic() + 30
    finally:
        client.close()
