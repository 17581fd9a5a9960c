"""``MultiplexedConnection``: one Redis connection that carries the round trips of every greenlet of
a gevent worker, those made while others are waiting for replies written together.

Under load a gevent worker serves many callbacks at once, and each used to make its round trips on
a connection of its own: a write, a wait in the event loop and a read per round trip, and as many
reads and writes for redis-server. Those system calls and wake-ups cost more than the commands.
Here a round trip on an idle connection is written at once. One made while replies are owed joins
a buffer instead, which is written when the replies come back (the greenlets they wake queue their
next round trips first) or at the end of the event loop's pass, whichever comes first. The replies
are handed back in the order the commands were written, which is the order Redis answers them in.
Under load a write carries several round trips and a read answers several.

Writing the buffer when replies come back, not only once per pass of the loop, keeps the round trips
of a greenlet as quick as on a connection of its own: an agent's results, several round trips each,
would otherwise fall behind the callbacks (measured: a backlog of seconds after 20 s of load).

It serves a plain gevent socket (TCP or Unix, not TLS), called from a greenlet of the hub it was
made under (``serves_current``). redis-py 8 speaks RESP3 unless told otherwise; a push notification,
which answers no command, goes to the connection's parser as on a connection of one's own. Anything else goes through
``relay.stores.redis_pipeline.Connections`` as before, and so do round trips that must have a
connection to themselves: ``WAIT`` holds its connection until the replicas answer.

Failures end every round trip waiting on the connection, as each would have ended on a connection
of its own:

* nothing read for the socket timeout while replies are owed: ``redis.TimeoutError``;
* the server closed the connection, or a read or write failed: ``redis.ConnectionError``;
* opening the connection failed: the error the opening greenlet raises.

The connection is then closed, and the next round trip opens it again (redis-py's handshake and
the store's ``on_connect`` hook included). An error reply stays in its place in its round trip's
replies, as ``ConnectionPipeline`` leaves it; a reply that is a ``redis.ConnectionError``
(``LOADING``) is raised to that round trip alone, since the replies still line up.
"""
from __future__ import annotations

import sys
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

import redis
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR

from relay.stores.redis_connect import connection_error_in, read_failed, write_failed
from relay.stores.redis_pipeline import pack

#: Bytes read from the socket at a time.
READ_SIZE = 65536
_READ, _WRITE = 1, 2
_PLAIN_CONNECTIONS = (redis.Connection, redis.UnixDomainSocketConnection)


def multiplexable(pool: Any) -> bool:
    """Whether ``pool`` makes connections a ``MultiplexedConnection`` can take: plain (not TLS),
    over gevent's sockets (the worker is monkey-patched). Asked once per pool."""
    gevent_socket = sys.modules.get("gevent._socket3")
    return (gevent_socket is not None and type(pool) is redis.ConnectionPool
            and pool.connection_class in _PLAIN_CONNECTIONS
            and getattr(redis.connection.socket, "socket", None) is gevent_socket.socket)


class MultiplexedConnection:
    """One connection of ``pool`` shared by the greenlets of the current thread's gevent hub."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        from gevent import getcurrent
        from gevent._hub_local import get_hub_if_exists
        from gevent.hub import Waiter, get_hub

        self._waiter_class = Waiter
        self._current_greenlet = getcurrent
        self._current_hub = get_hub_if_exists
        self._hub = get_hub()
        self._loop = self._hub.loop
        self._pool = pool
        self._connection: Any = pool.get_connection()
        timeout_s = pool.connection_kwargs.get("socket_timeout")
        #: Fires when owed replies have not progressed for the socket timeout. libev's ``again``
        #: arms a timer for its repeat value, libuv's for its after value: both are the timeout.
        self._timer = self._loop.timer(timeout_s, timeout_s) if timeout_s else None
        self._socket: Any = None
        self._reader: Any = None
        self._push_type: Any = None
        self._read_watcher: Any = None
        self._write_watcher: Any = None
        self._opening = False
        self._buffer = bytearray(READ_SIZE)
        #: Packed commands queued since the last write.
        self._queued: list[bytes] = []
        self._flush_scheduled = False
        #: Bytes the socket did not take at the last write; written when it is writable again.
        self._unwritten = b""
        #: Per round trip not yet answered, in the order its commands were queued: how many replies
        #: it is owed and the waiter to hand them to.
        self._owed: deque[tuple[int, Any]] = deque()
        #: Replies read so far for the round trip at the head of ``_owed``.
        self._partial: list[Any] = []
        self._closed = False
        #: Round trips carried and writes made (a write carries every round trip queued before it).
        self.round_trips = 0
        self.writes = 0

    @classmethod
    def for_current_hub(cls, pool: redis.ConnectionPool) -> Optional["MultiplexedConnection"]:
        """One for the calling greenlet's hub; ``None`` where no gevent hub runs this thread, or
        when called from the hub itself (which cannot wait)."""
        from gevent import getcurrent
        from gevent._hub_local import get_hub_if_exists

        hub = get_hub_if_exists()
        if hub is None or getcurrent() is hub:
            return None
        return cls(pool)

    def serves_current(self) -> bool:
        """Whether the calling greenlet may use it: one of its hub's greenlets, not the hub itself."""
        hub = self._hub
        return not self._closed and self._current_hub() is hub and self._current_greenlet() is not hub

    def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands``, in order, an error reply in its place. Raises
        ``redis.TimeoutError`` or ``redis.ConnectionError`` as described above."""
        if self._closed:
            raise redis.ConnectionError("the shared connection was closed")
        if self._socket is None and not self._opening:
            self._open()
        waiter = self._waiter_class(self._hub)
        self._queued.extend(pack(self._connection, commands))
        self._owed.append((len(commands), waiter))
        self.round_trips += 1
        if self._socket is not None:
            timer = self._timer
            if timer is not None and not timer.active:
                timer.again(self._timed_out)
            if len(self._owed) == 1 and not self._unwritten:
                self._flush()  # nothing else in flight: no reason to wait
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.run_callback(self._flush)
        replies = waiter.get()
        for reply in replies:
            refused = connection_error_in(reply)
            if refused is not None:
                raise refused
        return replies

    def close(self) -> None:
        """Fail what is owed, close the connection and give it back to its pool."""
        if self._closed:
            return
        self._closed = True
        self._fail(redis.ConnectionError("the store was closed"))
        self._pool.release(self._connection)

    # -- the connection -------------------------------------------------------------------------
    def _open(self) -> None:
        """Connect in the calling greenlet; round trips queued meanwhile wait for it."""
        self._opening = True
        try:
            self._connection.connect()
        except BaseException as error:
            self._opening = False
            self._fail(error if isinstance(error, redis.RedisError) else redis.ConnectionError(str(error)))
            raise
        self._opening = False
        connection = self._connection
        self._socket = connection._sock._sock
        self._reader = connection._parser._reader
        self._push_type = getattr(connection._parser, "_hiredis_PushNotificationType", None)
        fileno = self._socket.fileno()
        self._read_watcher = self._loop.io(fileno, _READ)
        self._write_watcher = self._loop.io(fileno, _WRITE)
        self._read_watcher.start(self._readable)
        if self._queued:
            self._flush_scheduled = True
            self._loop.run_callback(self._flush)
        if self._owed and self._timer is not None:
            self._timer.again(self._timed_out)

    def _fail(self, error: BaseException, also: Sequence[Any] = ()) -> None:
        """End every owed round trip (and the waiters in ``also``) with a copy of ``error``, and
        close the connection."""
        owed, self._owed = self._owed, deque()
        self._queued, self._partial, self._unwritten = [], [], b""
        for watcher in (self._read_watcher, self._write_watcher, self._timer):
            if watcher is not None:
                watcher.stop()
        self._read_watcher = self._write_watcher = None
        self._socket = self._reader = None
        self._connection.disconnect()
        for waiter in [*(waiter for _, waiter in owed), *also]:
            # Thrown from the hub, as a waiter must be; each greenlet gets an exception of its own.
            self._loop.run_callback(waiter.throw, type(error)(*error.args))

    # -- event-loop callbacks (run in the hub) --------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._socket is None or not self._queued:
            return
        data = b"".join(self._queued)
        self._queued = []
        if self._unwritten:
            self._unwritten += data
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            sent = self._socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._fail(write_failed(error))
            return
        self.writes += 1
        if sent < len(data):
            self._unwritten = data[sent:]
            self._write_watcher.start(self._writable)

    def _writable(self) -> None:
        data, self._unwritten = self._unwritten, b""
        self._write_watcher.stop()
        if data:
            self._write(data)

    def _timed_out(self) -> None:
        self._fail(redis.TimeoutError("Timeout reading from socket"))

    def _readable(self) -> None:
        try:
            size = self._socket.recv_into(self._buffer)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(read_failed(error))
            return
        if size == 0:
            self._fail(redis.ConnectionError(SERVER_CLOSED_CONNECTION_ERROR))
            return
        self._reader.feed(self._buffer, 0, size)
        owed, partial = self._owed, self._partial
        answered = []
        while owed:
            count, waiter = owed[0]
            while len(partial) < count:
                reply = self._next_reply()
                if reply is NOT_ENOUGH_DATA:
                    break
                partial.append(reply)
            if len(partial) < count:
                break
            owed.popleft()
            answered.append((waiter, partial))
            partial = []
        self._partial = partial
        if not owed and self._next_reply() is not NOT_ENOUGH_DATA:
            # Out of step: no reply read on this connection can be trusted, those just read included.
            self._fail(redis.ConnectionError("Redis sent a reply nothing was waiting for"),
                       also=[waiter for waiter, _ in answered])
            return
        timer = self._timer
        if timer is not None:
            if owed:
                timer.again(self._timed_out)
            else:
                timer.stop()
        for waiter, replies in answered:
            waiter.switch(replies)
        if self._queued and self._socket is not None:
            self._flush()  # what the woken greenlets queued, together

    def _next_reply(self) -> Any:
        """The next reply read, or ``NOT_ENOUGH_DATA``. A RESP3 push notification (a key invalidated
        for client tracking, a maintenance notice) answers no command: the connection's parser
        handles it, as ``ReadinessParser.read_replies`` does."""
        reader, push_type = self._reader, self._push_type
        while True:
            reply = reader.gets()
            if push_type is None or not isinstance(reply, push_type):
                return reply
            self._connection._parser.handle_push_response(reply)

