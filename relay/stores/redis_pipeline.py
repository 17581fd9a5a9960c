"""``ConnectionPipeline``: commands sent in one round trip on one pooled connection.

redis-py's ``Pipeline`` wraps every command in layers the store does not use: per-command
methods with argument deprecation checks, response callbacks, first-use ``HIMPORT`` preparation,
its own retry loop and per-pipeline observability. Measured under load, those layers cost more
relay CPU than the round trip itself (about 140 Python calls per round trip). The store already
validates arguments, converts replies and retries on its own (``relay/stores/redis.py``), so this
pipeline keeps only what a round trip needs, all of it redis-py's public connection API: a
connection from the client's pool (so Sentinel following and per-process pools still apply), the
commands packed into one write, and one reply read per command.

A command the server answers with an error leaves its ``redis.ResponseError`` (or subclass, such as
``OutOfMemoryError``) in the reply list; the connection stays in sync because every reply is read.
A connection error or timeout is raised as redis-py raises it, and the connection, which may hold
half a reply, is disconnected before it goes back to the pool.
"""
from __future__ import annotations

from typing import Any

import redis


class ConnectionPipeline:
    """Queue commands with ``execute_command``, then ``execute`` them in one round trip."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self._commands.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The raw replies, in order (a list and an error reply raised unless ``raise_on_error`` is
        false, when it is returned in its place, as redis-py's pipeline does)."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        connection = self._pool.get_connection()
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as error:
                    replies.append(error)
        finally:
            self._pool.release(connection)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, redis.ResponseError):
                    raise reply
        return replies
