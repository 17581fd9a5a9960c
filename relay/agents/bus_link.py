"""The bus's Redis pub/sub on each kind of deployment (``relay/stores/redis_connect.py`` connects).

``AgentBus`` needs three things of Redis: publish a message and learn how many subscribers received
it, count the subscribers of channels, and listen on its own channel. How:

* **one server, or a Sentinel-managed primary**: ``PUBLISH``, ``PUBSUB NUMSUB`` and ``SUBSCRIBE``.
  On Sentinel, every connection goes to the current primary. A subscription is dropped (so the
  listener subscribes again) when the sentinels name another primary: a demoted primary is
  reconfigured by its sentinels only when they next poll it, and until then it would still deliver
  to subscribers left on it, unseen by publishers that moved on.
* **Redis Cluster**: sharded pub/sub (Redis 7), ``SPUBLISH``, ``PUBSUB SHARDNUMSUB`` and
  ``SSUBSCRIBE``. A shard channel lives in the slot of its name, like a key; the listener subscribes
  on the primary serving that slot, and ``SPUBLISH`` goes to that primary, so the receiver count it
  answers counts the subscriber (classic ``PUBLISH`` reaches every node of a cluster, but answers
  the count of the node it was sent to only, which breaks the "no receiver: the holder is gone"
  rule). When the slot moves (a failover, resharding) the server ends the subscription
  (``sunsubscribe``) and the listener subscribes again where the slot now is.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Optional

import redis
from redis.cluster import RedisCluster

from relay.stores.redis_connect import ClientOptions, Client, connect, connect_node, serves_primary

#: Subscribe confirmations and data messages, per pub/sub flavour.
_SUBSCRIBED = ("subscribe", "ssubscribe")
_MESSAGE = ("message", "smessage")
_ENDED = ("unsubscribe", "sunsubscribe")
#: Seconds between PINGs on an idle subscription, so a dead connection is noticed.
HEALTH_CHECK_S = 10


class Publisher:
    """Publishes and counts subscribers, on a client of the bus's own (never the store's), made at
    first use: a cluster client must reach a node to be made."""

    def __init__(self, url: str, options: ClientOptions) -> None:
        self._url = url
        self._options = options
        self._lock = threading.Lock()
        self._made: Optional[Client] = None

    @property
    def _client(self) -> Client:
        with self._lock:
            if self._made is None:
                self._made = connect(self._url, self._options)
            return self._made

    def publish(self, channel: str, text: str) -> int:
        """Publish ``text``; the number of subscribers that received it."""
        client = self._client
        if isinstance(client, RedisCluster):
            return int(client.spublish(channel, text))
        return int(client.publish(channel, text))

    def subscribers(self, channels: Iterable[str]) -> dict[str, int]:
        """The subscriber count of each channel."""
        names = list(channels)
        if not names:
            return {}
        cluster = self._client
        if not isinstance(cluster, RedisCluster):
            return {name: int(count) for name, count in cluster.pubsub_numsub(*names)}
        counts = {}
        for name in names:
            node = cluster.get_node_from_key(name)
            counts.update({channel: int(count) for channel, count in
                           cluster.pubsub_shardnumsub(name, target_nodes=node)})
        return counts

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, None
        if made is not None:
            made.close()


class Subscription:
    """One channel listened to; ``poll`` says what arrived."""

    def __init__(self, pubsub: Any, owner: Optional[Any] = None) -> None:
        self._pubsub = pubsub
        self._owner = owner

    def poll(self, timeout_s: float) -> tuple[str, Optional[str]]:
        """``("subscribed", None)``, ``("message", data)`` or ``("idle", None)``; raises
        ``redis.ConnectionError`` when the subscription ended or its server is no longer primary."""
        message = self._pubsub.get_message(timeout=timeout_s)
        if not serves_primary(self._pubsub):
            raise redis.ConnectionError("the subscription's server is no longer the primary")
        if message is None:
            return "idle", None
        kind = message["type"]
        if kind in _SUBSCRIBED:
            return "subscribed", None
        if kind in _MESSAGE:
            return "message", message["data"]
        if kind in _ENDED:
            raise redis.ConnectionError("the server ended the subscription (its slot moved)")
        return "idle", None

    def close(self) -> None:
        try:
            self._pubsub.close()
        finally:
            if self._owner is not None:
                self._owner.close()


def open_subscription(url: str, channel: str, options: ClientOptions) -> Subscription:
    """Subscribe to ``channel`` (see the module docstring for where)."""
    client = connect(url, options)
    if not isinstance(client, RedisCluster):
        pubsub = client.pubsub()
        pubsub.subscribe(channel)
        return Subscription(pubsub, owner=client)
    try:
        node = client.get_node_from_key(channel)
        node_client = connect_node(url, node.host, int(node.port), options)
    finally:
        client.close()
    pubsub = node_client.pubsub()
    pubsub.ssubscribe(channel)
    return Subscription(pubsub, owner=node_client)
