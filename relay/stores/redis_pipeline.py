"""``ConnectionPipeline``: commands sent in one round trip on one connection, and ``Connections``,
where that connection comes from.

redis-py's ``Pipeline`` wraps every command in layers the store does not use: per-command
methods with argument deprecation checks, response callbacks, first-use ``HIMPORT`` preparation,
its own retry loop and per-pipeline observability. Its ``ConnectionPool`` adds a lock, an event
and four observability records to every checkout and return. Measured under load, those layers
cost more relay CPU than the round trip itself. The store already validates arguments, converts
replies and retries on its own (``relay/stores/redis.py``), so this pipeline keeps only what a round
trip needs, through redis-py's public connection API: the commands packed into one write, and one
reply read per command. The commands are packed by hiredis, one call each (``pack``).

A command the server answers with an error leaves its ``redis.ResponseError`` (or subclass, such as
``OutOfMemoryError``) in the reply list; the connection stays in step because every reply is read.
A connection error or timeout is raised as redis-py raises it, and redis-py disconnects the
connection, which may hold half a reply, before it is handed back.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from hiredis import pack_command


def pack(connection: Any, commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """``commands`` in the Redis protocol, for one write on ``connection``.

    redis-py's ``pack_commands`` wraps hiredis in a Python layer per command (argument copies,
    splitting of multi-word names, chunk buffering) that costs three times the packing itself.
    Here each command is one ``hiredis.pack_command`` call; what that refuses (an argument of
    another type) and multi-word command names go through redis-py as before."""
    try:
        if not any(" " in command[0] for command in commands):
            return [b"".join([pack_command(command) for command in commands])]
    except TypeError:
        pass
    return connection.pack_commands(commands)


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
    """

    def __init__(self, pool: redis.ConnectionPool, keep: bool = True) -> None:
        self.pool = pool
        self._keep = keep and type(pool) is redis.ConnectionPool
        self._idle: list[Any] = []

    def take(self) -> Any:
        if not self._keep:
            return self.pool.get_connection()
        try:
            connection = self._idle.pop()
        except IndexError:
            return self.pool.get_connection()
        try:
            ready = connection.is_connected and not connection.can_read()
        except redis.ConnectionError:  # the parser read EOF
            ready = False
        if not ready:
            connection.disconnect()
        return connection

    def give_back(self, connection: Any) -> None:
        if self._keep:
            self._idle.append(connection)
        else:
            self.pool.release(connection)


class ConnectionPipeline:
    """Queue commands with ``execute_command``, then ``execute`` them in one round trip."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self._commands.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The raw replies, in order. An error reply is raised, or with ``raise_on_error`` false
        returned in its place, as redis-py's pipeline does."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        connection = self._connections.take()
        try:
            connection.send_packed_command(pack(connection, commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as error:
                    replies.append(error)
        finally:
            self._connections.give_back(connection)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, redis.ResponseError):
                    raise reply
        return replies
