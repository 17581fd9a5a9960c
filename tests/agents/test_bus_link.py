"""The bus's pub/sub on one server (``PUBLISH``) and on Redis Cluster (sharded, ``SPUBLISH``): a
receiver count that counts the subscriber wherever it is, and subscriber counts per channel."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from relay.agents.bus_link import Publisher, Subscription, open_subscription
from relay.stores.redis_connect import ClientOptions
from tests.support.rediscluster import LocalRedisCluster

OPTIONS = ClientOptions(socket_timeout_s=2, connect_timeout_s=1)
CHANNELS = [f"codexbridge:test:bus:host:{n}:x" for n in range(8)]


@pytest.fixture(params=["redis", "redis-cluster"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_server").url)
    return str(request.getfixturevalue("redis_cluster").url)


def poll_until(subscription: Subscription, kind: str, timeout_s: float = 3.0) -> tuple[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = subscription.poll(0.1)
        if event[0] == kind:
            return event
    raise AssertionError(f"no {kind} within {timeout_s} s")


@pytest.fixture
def publisher(url: str) -> Iterator[Publisher]:
    made = Publisher(url, OPTIONS)
    yield made
    made.close()


def test_every_channel_counts_its_own_subscriber(url: str, publisher: Publisher) -> None:
    subscriptions = [open_subscription(url, channel, OPTIONS) for channel in CHANNELS[:4]]
    try:
        for subscription in subscriptions:
            poll_until(subscription, "subscribed")
        assert publisher.subscribers(CHANNELS) == {c: (1 if n < 4 else 0) for n, c in enumerate(CHANNELS)}
        for n, channel in enumerate(CHANNELS):
            assert publisher.publish(channel, f"m{n}") == (1 if n < 4 else 0)
        for n, subscription in enumerate(subscriptions):
            assert poll_until(subscription, "message") == ("message", f"m{n}")
    finally:
        for subscription in subscriptions:
            subscription.close()
    assert publisher.subscribers([]) == {}


def test_a_cluster_subscription_ends_when_its_slot_moves() -> None:
    channel = CHANNELS[0]
    with LocalRedisCluster(masters=3) as own:  # its slot map is changed: not the shared cluster
        subscription = open_subscription(own.url, channel, OPTIONS)
        try:
            poll_until(subscription, "subscribed")
            with own.client() as client:
                slot = client.keyslot(channel)
                owner = client.get_node_from_key(channel)
                target = next(n for n in client.get_primaries() if n.name != owner.name)
                target_id = client.cluster_myid(target)
            for port in (int(owner.port), int(target.port)):
                with own.node_client(port) as node:
                    node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            with pytest.raises(redis.ConnectionError, match="slot moved"):
                poll_until(subscription, "never")
        finally:
            subscription.close()


def test_a_publisher_is_made_at_first_use() -> None:
    unreachable = Publisher("redis+cluster://127.0.0.1:1", OPTIONS)
    with pytest.raises(redis.ConnectionError):
        unreachable.publish("c", "m")
    unreachable.close()
