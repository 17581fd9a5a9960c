"""``ConnectionPipeline``: commands sent in one round trip on one connection, and ``Connections``,
where that connection comes from.

redis-py's ``Pipeline`` wraps every command in layers the store does not use: per-command
methods with argument deprecation checks, response callbacks, first-use ``HIMPORT`` preparation,
its own retry loop and per-pipeline observability. Its ``ConnectionPool`` adds a lock, an event
and four observability records to every checkout and return. Measured under load, those layers
cost more relay CPU than the round trip itself. The store already validates arguments, converts
replies and retries on its own (``relay/stores/redis.py``), so this pipeline keeps only what a round
trip needs: the commands packed into one write, and one reply read per command. The commands are
packed by hiredis, one call each (``pack``). The replies are read by the store's parser in one call
(``ReadinessParser.read_replies``, ``relay/stores/redis_connect.py``), or through redis-py's
``read_response`` one by one on a connection with another parser.

Under gevent a round trip goes over the worker's shared connection instead, where ``Connections``
offers one (``relay.stores.redis_multiplex``): same packing, same replies, another way of waiting.

A command the server answers with an error leaves its ``redis.ResponseError`` (or subclass, such as
``OutOfMemoryError``) in the reply list; the connection stays in step because every reply is read.
A connection error or timeout is raised as redis-py raises it, and the connection, which may hold
half a reply, is disconnected before it is handed back.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import redis
from hiredis import pack_command

from relay.stores.redis_connect import ReadinessParser, write_failed

if TYPE_CHECKING:
    from relay.stores.redis_multiplex import MultiplexedConnection


def pack(connection: Any, commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """``commands`` in the Redis protocol, for one write on ``connection``.

    redis-py's ``pack_commands`` wraps hiredis in a Python layer per command (argument copies,
    splitting of multi-word names, chunk buffering) that costs three times the packing itself.
    Here each command is one ``hiredis.pack_command`` call; what that refuses (an argument of
    another type) and multi-word command names go through redis-py as before."""
    for command in commands:
        if " " in command[0]:
            return connection.pack_commands(commands)
    try:
        return [b"".join([pack_command(command) for command in commands])]
    except TypeError:
        return connection.pack_commands(commands)


#: How redis-py's own connection classes send; a class that overrides it keeps its override.
_REDIS_PY_SEND = redis.Connection.send_packed_command


def send(connection: Any, packed: list[bytes]) -> None:
    """``connection.send_packed_command(packed)``, with one ``send`` where it can.

    On a connected connection without health checks, whose class sends as redis-py does, a payload
    in one piece goes to the socket's ``send``, which takes all of it when the socket buffer has
    room (a pipeline's few hundred bytes), and ``sendall`` has the rest; gevent's ``sendall`` alone
    loops with deadline bookkeeping and a memoryview per call. A socket without ``send`` (fakeredis's)
    keeps redis-py's path. Failures are redis-py's: ``redis.TimeoutError`` or
    ``redis.ConnectionError``, the connection disconnected first."""
    sock = connection._sock
    send_some = getattr(sock, "send", None)
    if (send_some is None or connection.health_check_interval or len(packed) != 1
            or type(connection).send_packed_command is not _REDIS_PY_SEND):
        connection.send_packed_command(packed)
        return
    payload = packed[0]
    try:
        sent = send_some(payload)
        if sent < len(payload):
            sock.sendall(memoryview(payload)[sent:])
    except socket.timeout:
        connection.disconnect()
        raise redis.TimeoutError("Timeout writing to socket") from None
    except OSError as error:
        connection.disconnect()
        raise write_failed(error) from None
    except BaseException:
        connection.disconnect()
        raise


def read_replies(connection: Any, count: int) -> list[Any]:
    """The next ``count`` replies on ``connection``, an error reply in its place. From the parser in
    one call where it can (``ReadinessParser.read_replies``), else one ``read_response`` each.
    A failure disconnects the connection, as ``read_response`` does."""
    parser = connection._parser
    if not isinstance(parser, ReadinessParser):
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as error:
                replies.append(error)
        return replies
    try:
        replies = parser.read_replies(count)
    except BaseException:
        connection.disconnect()
        raise
    if connection.health_check_interval:
        connection.next_health_check = time.monotonic() + connection.health_check_interval
    return replies


class Connections:
    """Connections of one redis-py pool for pipelines.

    On a plain ``redis.ConnectionPool`` a connection is checked out once and then kept here between
    round trips (``deque``-like ``list.pop``/``append`` need no lock), so the pool's per-checkout
    work is skipped; the pool still counts it against ``max_connections`` and disconnects it on
    ``close``. A kept connection that has something to read when it is taken (an error or EOF from
    a restarted server) is disconnected first, as the pool's checkout would, and reconnects on use.
    Other pools (Sentinel's, which re-checks where the primary is at checkout) are used as they are,
    and so is any pool with ``keep=False`` (a Redis Cluster node's, whose pools come and go with the
    topology).

    With ``multiplex``, a round trip made from a gevent greenlet goes over one connection shared by
    all of them (``shared``, ``relay.stores.redis_multiplex``) where the pool allows it.
    """

    def __init__(self, pool: redis.ConnectionPool, keep: bool = True, multiplex: bool = False) -> None:
        self.pool = pool
        self._keep = keep and type(pool) is redis.ConnectionPool
        self._idle: list[Any] = []
        self._multiplex = multiplex and self._keep
        self._shared: Optional[MultiplexedConnection] = None

    @property
    def shared_connection(self) -> Optional[MultiplexedConnection]:
        """The ``MultiplexedConnection`` once one was made, whoever may use it."""
        return self._shared

    def shared(self) -> Optional[MultiplexedConnection]:
        """The ``MultiplexedConnection`` the calling greenlet may use, or ``None``."""
        if not self._multiplex:
            return None
        shared = self._shared
        if shared is None:
            from relay.stores.redis_multiplex import MultiplexedConnection, multiplexable

            if not multiplexable(self.pool):
                self._multiplex = False
                return None
            shared = MultiplexedConnection.for_current_hub(self.pool)
            if shared is None:
                return None
            self._shared = shared
        return shared if shared.serves_current() else None

    def take(self) -> Any:
        if not self._keep:
            return self.pool.get_connection()
        try:
            connection = self._idle.pop()
        except IndexError:
            return self.pool.get_connection()
        parser = connection._parser
        try:
            # A connection of the relay's own is asked its parser directly; another (a client given to
            # ``RedisStore.from_client``, fakeredis's) through redis-py's API, which its class may define.
            ready = connection.is_connected and not (
                parser.can_read() if isinstance(parser, ReadinessParser) else connection.can_read())
        except (redis.ConnectionError, OSError):  # the parser read EOF, or the socket failed
            ready = False
        if not ready:
            connection.disconnect()
        return connection

    def give_back(self, connection: Any) -> None:
        if self._keep:
            self._idle.append(connection)
        else:
            self.pool.release(connection)

    def close(self) -> None:
        """Close the shared connection; the pool's own are closed with the pool."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()


class ConnectionPipeline:
    """Queue commands with ``execute_command``, then ``execute`` them in one round trip: over the
    shared connection where ``connections`` offers one, unless ``shared`` is false (the round trip
    must have a connection to itself)."""

    def __init__(self, connections: Connections, shared: bool = True) -> None:
        self._connections = connections
        self._shared = shared
        self._commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self._commands.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The raw replies, in order. An error reply is raised, or with ``raise_on_error`` false
        returned in its place, as redis-py's pipeline does."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        multiplexed = self._connections.shared() if self._shared else None
        if multiplexed is not None:
            replies = multiplexed.run(commands)
        else:
            connection = self._connections.take()
            try:
                send(connection, pack(connection, commands))
                replies = read_replies(connection, len(commands))
            finally:
                self._connections.give_back(connection)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, redis.ResponseError):
                    raise reply
        return replies
