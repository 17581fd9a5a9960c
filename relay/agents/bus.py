"""Frames for agents held by other relay processes, through Redis pub/sub, with delivery confirmed.

Every relay process (each gunicorn worker of each instance) holds its own agent sockets, and a
machine's record names the process holding its socket (``holder``, that process's instance id).
``AgentBus`` reaches a machine held elsewhere:

* each process subscribes to its own channel, ``<app>:<env>:bus:<instance id>``;
* ``deliver`` publishes ``{"type": "deliver", "id", "replyTo", "machineId", "frame", "waitMs"}`` to
  the holder's channel, with ``"attached"`` when the sender gives something for the holder's
  ``DeliveryListener`` (a dispatched command's records as written). ``PUBLISH`` answers how many
  subscribers received it: none means the holder is gone (stopped, killed, or cut off from Redis),
  and the delivery fails at once;
* the holder sends the frame on its local socket and publishes ``{"type": "delivered", "id", "ok"}``
  to ``replyTo``; the sender waits for that answer at most ``timeout_s``. No answer: not delivered,
  and the caller records the command as ``machine_offline``;
* ``forward`` publishes without ``id`` (traces): nobody answers, nobody waits.

The holder tells its ``DeliveryListener``, if it has one, about each frame it is asked to send and
what came attached, before the send (an agent may answer before ``send`` returns) and again when
the send failed.

The holder sends the frames of one machine one at a time, in the order they arrived, on a small
thread pool (``relay.agents.lanes``: a slow agent never blocks the listener or other machines). A
request that waited in the holder's queue for more than half of its sender's wait is answered "not
delivered" without being sent, so a command is not handed to an agent long after its sender gave up
on it.

On a Redis Cluster the same works with sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``), and on a
Sentinel-managed primary the listener follows the primary; ``relay/agents/bus_link.py`` has how.

The listener thread reconnects with a capped exponential backoff and never raises. While it is not
subscribed, this process receives nothing (its senders see no subscriber) and its own deliveries to
other processes fail at once (their answers could not reach it).
"""
from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Protocol

import redis

from relay.agents.bus_link import HEALTH_CHECK_S, Publisher, open_subscription
from relay.agents.lanes import SerialLanes
from relay.agents.sessions import SessionRegistry
from relay.jsontext import compact_bytes, parse
from relay.stores.keys import KeySpace
from relay.stores.redis_connect import ClientOptions

log = logging.getLogger("relay.bus")

#: The key-space segment of the bus channels.
CHANNEL_DOMAIN = "bus"
#: Listener reconnect backoff, seconds (doubled per failure, with jitter, up to the cap).
BACKOFF_START_S = 0.1
BACKOFF_CAP_S = 5.0
#: How long the listener blocks for one message before checking whether it should stop.
POLL_S = 0.25


class _Waiter:
    """One delivery waiting for its holder's answer."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False

    def resolve(self, ok: bool) -> None:
        self.ok = ok
        self.event.set()


class DeliveryListener(Protocol):
    """Told on the holder about the frames other processes deliver through it."""

    def before_send(self, machine_id: str, frame: dict[str, Any], attached: Any) -> None:
        """A frame is about to go out on this process's socket; ``attached`` is what its sender
        attached (``None`` when nothing)."""

    def send_failed(self, machine_id: str, frame: dict[str, Any], attached: Any) -> None:
        """The frame announced by ``before_send`` was not sent."""


class AgentBus:
    """Delivery to machines whose socket another relay process holds (see the module docstring)."""

    def __init__(
        self,
        redis_url: str,
        keys: KeySpace,
        instance_id: str,
        sessions: SessionRegistry,
        *,
        timeout_s: float = 1.5,
        socket_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        workers: int = 8,
        listener: Optional[DeliveryListener] = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self._url = redis_url
        self._keys = keys
        self._sessions = sessions
        self._socket_timeout_s = socket_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._workers = workers
        self._listener = listener
        self.channel = self.channel_of(instance_id)
        self._lock = threading.Lock()
        self._pending: dict[str, _Waiter] = {}
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._publisher: Optional[Publisher] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._queues: Optional[SerialLanes] = None

    # -- addressing -------------------------------------------------------------------------------
    def channel_of(self, instance_id: str) -> str:
        """The pub/sub channel a process listens on."""
        return self._keys.key(CHANNEL_DOMAIN, instance_id)

    @property
    def connected(self) -> bool:
        """The listener is subscribed: this process can receive frames and answers."""
        return self._subscribed.is_set()

    def reaches(self, holder: Optional[str]) -> bool:
        """``holder`` is another process, and the bus is up to try delivering to it."""
        return bool(holder) and holder != self.instance_id and self.connected

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, wait_s: float = 2.0) -> bool:
        """Start the listener in the process that serves (after gunicorn forked the worker) and wait up
        to ``wait_s`` for its subscription, so that agents saying hello here are reachable at once.
        ``False`` if it is not subscribed yet (Redis down: it keeps trying in the background)."""
        if self._thread is None:
            self._stop.clear()
            self._publisher = Publisher(self._url, self._options(listener=False))
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="bus-deliver")
            self._queues = SerialLanes(self._pool.submit, name="bus delivery")
            self._thread = threading.Thread(target=self._listen, name="agent-bus", daemon=True)
            self._thread.start()
        return self._subscribed.wait(wait_s)

    def stop(self) -> None:
        """Unsubscribe, fail the deliveries still waiting, and release the connections."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=POLL_S * 4 + self._socket_timeout_s)
        self._fail_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until the listener is subscribed; ``False`` after ``timeout_s``."""
        return self._subscribed.wait(timeout_s)

    # -- sending ----------------------------------------------------------------------------------
    def deliver(self, holder: str, machine_id: str, frame: dict[str, Any], attached: Any = None) -> bool:
        """Have ``holder`` send ``frame`` on its socket for ``machine_id``; ``True`` once it confirms.
        ``attached`` (JSON) goes to the holder's ``DeliveryListener`` with the frame.

        ``False`` when the bus is down, the holder is gone or does not hold the machine any more,
        its send failed, or no answer came within ``timeout_s``.
        """
        if not self.reaches(holder):
            return False
        request_id = uuid.uuid4().hex
        waiter = _Waiter()
        with self._lock:
            self._pending[request_id] = waiter
        message = {"type": "deliver", "id": request_id, "replyTo": self.instance_id, "machineId": machine_id,
                   "frame": frame, "waitMs": int(self.timeout_s * 1000)}
        if attached is not None:
            message["attached"] = attached
        try:
            receivers = self._publish(holder, message)
            if receivers == 0:
                log.info("bus holder %s is gone (machine %s)", holder, machine_id,
                         extra={"event": "bus_holder_gone", "holder": holder, "machine_id": machine_id})
                return False
            if not waiter.event.wait(self.timeout_s):
                log.warning("bus holder %s did not answer within %.1f s (machine %s)", holder, self.timeout_s,
                            machine_id, extra={"event": "bus_delivery_timeout", "holder": holder,
                                               "machine_id": machine_id})
                return False
            return waiter.ok
        except redis.RedisError as exc:
            log.warning("bus publish failed: %s", type(exc).__name__, extra={"event": "bus_publish_failed"})
            return False
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def forward(self, holder: str, machine_id: str, frame: dict[str, Any]) -> None:
        """Send ``frame`` through ``holder`` without waiting or confirmation (traces)."""
        if not self.reaches(holder):
            return
        try:
            self._publish(holder, {"type": "deliver", "machineId": machine_id, "frame": frame})
        except redis.RedisError as exc:
            log.info("bus forward failed: %s", type(exc).__name__, extra={"event": "bus_publish_failed"})

    def live_instances(self, instance_ids: Iterable[str]) -> set[str]:
        """Those of ``instance_ids`` whose listener is subscribed now; raises ``redis.RedisError``."""
        ids = sorted(set(instance_ids))
        publisher = self._publisher
        if publisher is None:
            raise redis.ConnectionError("the bus is not started")
        if not ids:
            return set()
        counts = publisher.subscribers(self.channel_of(i) for i in ids)
        return {i for i in ids if counts.get(self.channel_of(i), 0) > 0}

    def _publish(self, instance_id: str, message: dict[str, Any]) -> int:
        publisher = self._publisher
        if publisher is None:
            raise redis.ConnectionError("the bus is not started")
        return publisher.publish(self.channel_of(instance_id), compact_bytes(message))

    # -- receiving --------------------------------------------------------------------------------
    def _listen(self) -> None:
        backoff = BACKOFF_START_S
        while not self._stop.is_set():
            subscription = None
            try:
                subscription = open_subscription(self._url, self.channel, self._options(listener=True))
                while not self._stop.is_set():
                    kind, data = subscription.poll(POLL_S)
                    if kind == "subscribed":
                        self._subscribed.set()
                        backoff = BACKOFF_START_S
                        log.info("bus listening on %s", self.channel, extra={"event": "bus_subscribed"})
                    elif kind == "message" and data is not None:
                        self._on_message(data)
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any Redis failure
                if not self._stop.is_set():
                    # a lost subscription is a warning; the retries of an outage that goes on are not
                    level = logging.WARNING if self._subscribed.is_set() else logging.INFO
                    log.log(level, "bus listener cannot reach Redis (%s); retrying in %.1f s", type(exc).__name__,
                            backoff, extra={"event": "bus_disconnected", "error": type(exc).__name__})
            finally:
                self._subscribed.clear()
                self._fail_pending()
                if subscription is not None:
                    _close_quietly(subscription)
            if self._stop.wait(backoff * random.uniform(0.5, 1.0)):
                break
            backoff = min(backoff * 2, BACKOFF_CAP_S)

    def _on_message(self, data: str) -> None:
        try:
            message = parse(data)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            log.warning("unreadable bus message ignored", extra={"event": "bus_message_invalid"})
            return
        if kind == "delivered":
            with self._lock:
                waiter = self._pending.get(str(message.get("id")))
            if waiter is not None:
                waiter.resolve(message.get("ok") is True)
        elif kind == "deliver" and isinstance(message.get("machineId"), str) and isinstance(
                message.get("frame"), dict) and self._queues is not None:
            received = time.monotonic()
            self._queues.submit(message["machineId"], lambda: self._send_locally(message, received))

    def _send_locally(self, message: dict[str, Any], received: float) -> None:
        """Send a requested frame on this process's socket and answer the sender if it waits."""
        request_id, reply_to = message.get("id"), message.get("replyTo")
        wait_ms = message.get("waitMs")
        late = isinstance(wait_ms, int) and (time.monotonic() - received) * 1000 > wait_ms / 2
        machine_id, frame, attached = message["machineId"], message["frame"], message.get("attached")
        session = None if late else self._sessions.get(machine_id)
        listener = self._listener if session is not None else None
        if listener is not None:
            listener.before_send(machine_id, frame, attached)
        ok = session is not None and session.send_json(frame)
        if listener is not None and not ok:
            listener.send_failed(machine_id, frame, attached)
        if request_id and isinstance(reply_to, str):
            try:
                self._publish(reply_to, {"type": "delivered", "id": request_id, "ok": ok})
            except redis.RedisError as exc:
                log.warning("bus answer failed: %s", type(exc).__name__, extra={"event": "bus_publish_failed"})

    def _fail_pending(self) -> None:
        with self._lock:
            waiters = list(self._pending.values())
        for waiter in waiters:
            waiter.resolve(False)

    def _options(self, *, listener: bool) -> ClientOptions:
        """Connections of its own, never the store's pool (``relay/agents/bus_link.py`` says how each
        kind of deployment is used). The listener's connection mostly waits (its reads are bounded by
        ``POLL_S``) and pings Redis every 10 s, so a broken connection is noticed even when no message
        arrives."""
        return ClientOptions(
            socket_timeout_s=self._socket_timeout_s * (5 if listener else 1),
            connect_timeout_s=self._connect_timeout_s,
            keepalive=True,
            health_check_interval_s=HEALTH_CHECK_S if listener else 0,
        )


def _close_quietly(subscription: Any) -> None:
    try:
        subscription.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail again
        pass
