"""``MultiplexedConnection`` on a real redis-server, in gevent greenlets as gunicorn's gevent worker
runs requests. Each test gives redis-py gevent's sockets, as the worker's monkey-patching does."""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gevent
import gevent.socket
import hiredis
import pytest
import redis

from config.settings import load_settings
from relay.stores.base import Op, StoreUnavailable
from relay.stores.factory import build_redis_store
from relay.stores.keys import KeySpace
from relay.stores.redis import RedisStore
from relay.stores.redis_multiplex import MultiplexedConnection, multiplexable
from relay.stores.redis_pipeline import ConnectionPipeline, Connections
from relay.stores.replication import NotReplicated, ReplicaWait
from tests.support.redisproc import RedisServer

TIMEOUT_S = 0.3
KEYS = KeySpace("relay", "test")
#: ``REDIS_WAIT_REPLICAS`` covers the reservation, not the audit record.
RESERVATION = KEYS.key("idempotency", "msg-1")
AUDIT = KEYS.key("audit", "cmd-1", colocated=True)


@pytest.fixture
def gevent_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis.connection, "socket", gevent.socket)


@pytest.fixture
def connections(gevent_sockets: None, redis_server: RedisServer) -> Iterator[Connections]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=TIMEOUT_S,
                                  socket_connect_timeout=TIMEOUT_S)
    multiplexed = Connections(client.connection_pool, multiplex=True)
    yield multiplexed
    multiplexed.close()
    client.close()


def in_greenlets(*calls: Callable[[], Any]) -> list[gevent.Greenlet]:
    """Run ``calls`` in greenlets started together; every one has ended when this returns."""
    greenlets = [gevent.spawn(call) for call in calls]
    gevent.joinall(greenlets, timeout=10)
    assert all(greenlet.ready() for greenlet in greenlets)
    return greenlets


def round_trip(connections: Connections, *commands: tuple[Any, ...], shared: bool = True) -> list[Any]:
    pipe = ConnectionPipeline(connections, shared=shared)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)


def opened(connections: Connections) -> MultiplexedConnection:
    """The shared connection, after one round trip opened it."""
    (greenlet,) = in_greenlets(partial(round_trip, connections, ("PING",)))
    assert greenlet.value == ["PONG"]
    shared = connections.shared_connection
    assert shared is not None
    return shared


def pings_during(connections: Connections, count: int, begin: Callable[[], None],
                 end: Callable[[], None]) -> list[type]:
    """What ``count`` greenlets' ``PING``s raise between ``begin()`` and ``end()`` of a fault."""
    begin()
    try:
        gevent.sleep(0.05)
        failed = in_greenlets(*[partial(round_trip, connections, ("PING",)) for _ in range(count)])
    finally:
        end()
    return [type(g.exception) for g in failed]


def pings_again(connections: Connections) -> bool:
    (again,) = in_greenlets(partial(round_trip, connections, ("PING",)))
    return again.value == ["PONG"]


def test_the_first_round_trip_goes_out_at_once_and_those_made_meanwhile_together(
        connections: Connections) -> None:
    shared = opened(connections)
    writes, carried = shared.writes, shared.round_trips
    greenlets = in_greenlets(*[partial(round_trip, connections, ("SET", f"k{i}", i), ("GET", f"k{i}"))
                               for i in range(10)])
    assert [g.value for g in greenlets] == [["OK", str(i)] for i in range(10)]
    assert shared.round_trips - carried == 10
    assert shared.writes - writes == 2


def test_the_next_round_trips_of_greenlets_woken_together_go_out_together(connections: Connections) -> None:
    """Each greenlet makes a second round trip as soon as its first is answered: those are written
    when the replies have been handed out, not one by one."""
    shared = opened(connections)

    def two_round_trips(i: int) -> list[Any]:
        return round_trip(connections, ("INCR", f"n{i}")) + round_trip(connections, ("INCR", f"n{i}"))

    writes = shared.writes
    greenlets = in_greenlets(*[partial(two_round_trips, i) for i in range(10)])
    assert [g.value for g in greenlets] == [[1, 2]] * 10
    assert shared.writes - writes < 10


def test_an_error_reply_stays_in_its_round_trip(connections: Connections, redis_server: RedisServer) -> None:
    redis_server.client().set("text", "abc")
    failing, other = in_greenlets(partial(round_trip, connections, ("INCR", "text"), ("GET", "text")),
                                  partial(round_trip, connections, ("GET", "text")))
    assert isinstance(failing.value[0], redis.ResponseError) and failing.value[1] == "abc"
    assert other.value == ["abc"]


def test_a_write_larger_than_the_socket_takes_is_finished_when_it_is_writable(connections: Connections) -> None:
    shared = opened(connections)
    writes = shared.writes
    value = "x" * (16 * 1024 * 1024)
    big, small = in_greenlets(partial(round_trip, connections, ("SET", "big", value), ("STRLEN", "big")),
                              partial(round_trip, connections, ("PING",)))
    assert big.value == ["OK", len(value)] and small.value == ["PONG"]
    assert shared.writes - writes >= 2


def test_a_paused_server_times_out_every_waiting_round_trip_and_the_next_reconnects(
        connections: Connections, redis_server: RedisServer) -> None:
    opened(connections)
    assert pings_during(connections, 5, redis_server.pause, redis_server.resume) == [redis.TimeoutError] * 5
    assert pings_again(connections)


def test_a_connection_the_server_closes_fails_what_it_owes_and_the_next_reconnects(
        connections: Connections, redis_server: RedisServer) -> None:
    opened(connections)
    (named,) = in_greenlets(partial(round_trip, connections, ("CLIENT", "SETNAME", "shared")))
    assert named.value == ["OK"]
    admin = redis_server.client()
    blocked = gevent.spawn(round_trip, connections, ("BLPOP", "nothing", "0.25"))
    gevent.sleep(0.05)
    (killed_id,) = [c["id"] for c in admin.client_list() if c["name"] == "shared"]
    assert admin.client_kill_filter(_id=killed_id) == 1
    blocked.join(5)
    assert isinstance(blocked.exception, redis.ConnectionError)
    (again,) = in_greenlets(partial(round_trip, connections, ("PING",)))
    assert again.value == ["PONG"]
    assert "shared" not in [c["name"] for c in admin.client_list()]


def test_a_reply_nothing_waits_for_closes_the_connection_and_the_next_round_trip_reopens_it(
        connections: Connections, redis_server: RedisServer) -> None:
    """Replies are matched to round trips by their order alone: one that nobody asked for means the
    connection is out of step, so it is closed rather than trusted."""
    shared = opened(connections)
    admin = redis_server.client()
    (named,) = in_greenlets(partial(round_trip, connections, ("CLIENT", "SETNAME", "out-of-step")))
    assert named.value == ["OK"]
    shared._socket.send(b"*1\r\n$4\r\nPING\r\n")  # a command written past the shared connection
    gevent.sleep(0.1)
    assert "out-of-step" not in [c["name"] for c in admin.client_list()]
    (again,) = in_greenlets(partial(round_trip, connections, ("SET", "k", "v"), ("GET", "k")))
    assert again.value == ["OK", "v"]


class LoadingServer:
    """A stand-in for a redis-server still loading its data: ``GET`` is refused with ``LOADING``,
    ``PING`` answered, anything else (the connection's handshake) accepted. On a thread of its own."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        reader = hiredis.Reader()
        with conn:
            while data := conn.recv(65536):
                reader.feed(data)
                answers = []
                while (command := reader.gets()) is not False:
                    name = command[0].upper()
                    answers.append(b"-LOADING Redis is loading the dataset in memory\r\n" if name == b"GET"
                                   else b"+PONG\r\n" if name == b"PING" else b"+OK\r\n")
                conn.sendall(b"".join(answers))

    def close(self) -> None:
        self._listener.close()


def test_a_loading_reply_is_raised_to_its_round_trip_alone(gevent_sockets: None) -> None:
    """``LOADING`` comes as a reply in its place, so the replies still line up: the round trip it
    answers raises it, the others get theirs, and the connection stays open."""
    server = LoadingServer()
    # RESP2: the stand-in answers no HELLO.
    client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=TIMEOUT_S, protocol=2)
    connections = Connections(client.connection_pool, multiplex=True)
    try:
        shared = opened(connections)
        loading, other = in_greenlets(partial(round_trip, connections, ("GET", "k")),
                                      partial(round_trip, connections, ("PING",)))
        assert isinstance(loading.exception, redis.BusyLoadingError)
        assert other.value == ["PONG"]
        (again,) = in_greenlets(partial(round_trip, connections, ("PING",)))
        assert again.value == ["PONG"] and connections.shared_connection is shared and shared._socket is not None
    finally:
        connections.close()
        client.close()
        server.close()


def test_a_connection_that_cannot_be_opened_fails_the_round_trips_queued_for_it(
        connections: Connections, redis_server: RedisServer) -> None:
    """The first round trip opens the connection; those made meanwhile wait for it, and fail with it."""
    opened(connections)
    # The server's close is noticed first; then every round trip finds the connection to open.
    assert pings_during(connections, 3, redis_server.stop, redis_server.start) == [redis.ConnectionError] * 3
    assert pings_again(connections)


def test_a_push_notification_between_replies_goes_to_the_parser_and_the_replies_stay_in_step(
        connections: Connections, redis_server: RedisServer) -> None:
    """redis-py 8 speaks RESP3: with client tracking on, the server pushes an invalidation when a
    key this connection read changes. It answers no command, so it is neither a reply nor out of
    step: the connection stays open."""
    shared = opened(connections)
    (tracking,) = in_greenlets(partial(round_trip, connections, ("CLIENT", "SETNAME", "tracking"),
                                       ("CLIENT", "TRACKING", "ON"), ("GET", "tracked")))
    assert tracking.value == ["OK", "OK", None]
    admin = redis_server.client()
    admin.set("tracked", "changed")  # the server pushes the invalidation now, with nothing owed
    gevent.sleep(0.1)
    (read,) = in_greenlets(partial(round_trip, connections, ("GET", "tracked"), ("PING",)))
    assert read.value == ["changed", "PONG"]
    admin.set("tracked", "again")  # and again, this time right before a round trip's replies
    (reread,) = in_greenlets(partial(round_trip, connections, ("GET", "tracked")))
    assert reread.value == ["again"]
    assert "tracking" in [c["name"] for c in admin.client_list()] and shared._socket is not None


def test_a_round_trip_that_must_not_share_takes_a_pooled_connection(connections: Connections) -> None:
    shared = opened(connections)
    carried = shared.round_trips
    (alone,) = in_greenlets(partial(round_trip, connections, ("PING",), shared=False))
    assert alone.value == ["PONG"] and shared.round_trips == carried


def test_nothing_is_shared_with_the_hub_or_another_thread(connections: Connections) -> None:
    """The hub cannot wait for a reply, and a thread without a hub has no loop to wait in: both take
    a pooled connection."""
    shared = opened(connections)
    from_hub: list[Any] = []
    gevent.get_hub().loop.run_callback(lambda: from_hub.append(connections.shared()))
    gevent.sleep(0.01)
    assert from_hub == [None] and connections.shared() is shared
    from_thread: list[Any] = []
    thread = gevent.get_hub().threadpool.spawn(lambda: from_thread.append((connections.shared(),
                                                                           round_trip(connections, ("PING",)))))
    thread.get(timeout=10)
    assert from_thread == [(None, ["PONG"])]


def test_only_plain_pools_over_gevent_sockets_are_multiplexed(gevent_sockets: None,
                                                               redis_server: RedisServer) -> None:
    assert multiplexable(redis.ConnectionPool.from_url(redis_server.url))
    assert multiplexable(redis.ConnectionPool.from_url(redis_server.url, protocol=2))
    assert not multiplexable(redis.ConnectionPool.from_url(redis_server.url.replace("redis://", "rediss://")))
    assert not multiplexable(redis.BlockingConnectionPool.from_url(redis_server.url))


def test_without_gevent_sockets_nothing_is_multiplexed(redis_server: RedisServer) -> None:
    assert not multiplexable(redis.ConnectionPool.from_url(redis_server.url))


# -- through the store (its pipelines: the unit of work's round trips) -----------------------------
def test_a_store_shares_one_connection_among_greenlets_and_reports_it(gevent_sockets: None,
                                                                      redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, breaker=None)
    try:
        in_greenlets(partial(store.execute, [Op("set", ("a", "1", None))]))
        reads = in_greenlets(*[partial(store.execute, [Op("get", ("a",))]) for _ in range(4)])
        assert [r.value for r in reads] == [["1"]] * 4
        assert store.health()["sharedConnection"] == {"roundTrips": 5, "writes": 3}
    finally:
        store.close()


def test_a_store_with_multiplex_off_has_no_shared_connection(gevent_sockets: None,
                                                             redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, breaker=None, multiplex=False)
    try:
        (read,) = in_greenlets(partial(store.execute, [Op("set", ("a", "1", None)), Op("get", ("a",))]))
        assert read.value == [None, "1"]
        assert store.health()["sharedConnection"] is None
    finally:
        store.close()


def test_a_write_followed_by_wait_keeps_its_own_connection(gevent_sockets: None, redis_server: RedisServer) -> None:
    """``WAIT`` holds its connection until the replicas answer: it must not hold up the others."""
    store = RedisStore(redis_server.url, breaker=None, replica_wait=ReplicaWait.for_domains(KEYS, 1, 50))
    try:
        in_greenlets(partial(store.execute, [Op("set", (AUDIT, "v", None))]))
        carried = store.health()["sharedConnection"]["roundTrips"]
        (reserve,) = in_greenlets(partial(store.set_if_absent, RESERVATION, "v", ttl_ms=60_000))
        assert isinstance(reserve.exception, NotReplicated) and isinstance(reserve.exception, StoreUnavailable)
        assert store.replica_wait is not None and store.replica_wait.shortfalls == 1
        assert store.health()["sharedConnection"]["roundTrips"] == carried
    finally:
        store.close()


@pytest.mark.parametrize("value, multiplex", [(None, True), ("false", False), ("on", True)])
def test_redis_multiplex_reaches_the_store(redis_server: RedisServer, value: Any, multiplex: bool) -> None:
    env = {"REDIS_URL": redis_server.url, **({"REDIS_MULTIPLEX": value} if value else {})}
    store = build_redis_store(load_settings(env))
    try:
        assert store.multiplex is multiplex
    finally:
        store.close()
