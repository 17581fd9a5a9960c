"""``AgentBus`` against a real redis-server: confirmed delivery, gone holders, order, Redis restarts."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relay.agents.bus import AgentBus
from relay.agents.sessions import SessionRegistry
from relay.stores.keys import KeySpace
from tests.lifecycle.conftest import FakeAgent
from tests.support.redisproc import RedisServer

KEYS = KeySpace("codexbridge", "bustest")
MakeBus = Callable[..., AgentBus]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def attach(bus_sessions: SessionRegistry, machine_id: str) -> FakeAgent:
    agent = FakeAgent()
    bus_sessions.attach(machine_id, agent)
    return agent


@pytest.fixture
def make_bus(redis_server: RedisServer) -> Iterator[MakeBus]:
    buses: list[AgentBus] = []

    def build(instance_id: str, sessions: SessionRegistry | None = None, timeout_s: float = 1.0,
              listener: Any = None) -> AgentBus:
        bus = AgentBus(redis_server.url, KEYS, instance_id, sessions or SessionRegistry(), timeout_s=timeout_s,
                       listener=listener)
        assert bus.start(wait_s=5)
        buses.append(bus)
        return bus

    yield build
    for bus in buses:
        bus.stop()


def frame(n: int) -> dict[str, Any]:
    return {"type": "relay.trace", "trace": {"stage": f"s{n}"}}


def test_delivery_is_confirmed_by_the_holder(make_bus: MakeBus) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    assert sender.reaches("host:1:a") and not sender.reaches("host:2:b") and not sender.reaches(None)
    assert sender.deliver("host:1:a", "m1", {"type": "command", "command": {"commandId": "c1"}}) is True
    assert agent.frames == [{"type": "command", "command": {"commandId": "c1"}}]


def test_delivery_fails_when_the_holder_cannot_send(make_bus: MakeBus) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    assert sender.deliver("host:1:a", "elsewhere", frame(1)) is False
    agent.closed = True
    assert sender.deliver("host:1:a", "m1", frame(2)) is False
    assert agent.frames == []


class Listener:
    """A ``DeliveryListener`` noting what it was told, and how many frames the agent had by then."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.told: list[tuple[str, str, Any, int]] = []

    def before_send(self, machine_id: str, frame: dict[str, Any], attached: Any) -> None:
        self.told.append(("before_send", machine_id, attached, len(self.agent.frames)))

    def send_failed(self, machine_id: str, frame: dict[str, Any], attached: Any) -> None:
        self.told.append(("send_failed", machine_id, attached, len(self.agent.frames)))


def test_the_holder_hands_what_came_attached_to_its_listener_before_the_send(make_bus: MakeBus) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    listener = Listener(agent)
    make_bus("host:1:a", holder_sessions, listener=listener)
    sender = make_bus("host:2:b")
    assert sender.deliver("host:1:a", "m1", frame(1), attached={"commandId": "c1"}) is True
    assert sender.deliver("host:1:a", "m1", frame(2)) is True
    assert listener.told == [("before_send", "m1", {"commandId": "c1"}, 0), ("before_send", "m1", None, 1)]
    assert agent.frames == [frame(1), frame(2)]
    assert "attached" not in str(agent.frames)

    agent.closed = True
    assert sender.deliver("host:1:a", "m1", frame(3), attached={"commandId": "c3"}) is False
    assert listener.told[2:] == [("before_send", "m1", {"commandId": "c3"}, 2),
                                 ("send_failed", "m1", {"commandId": "c3"}, 2)]
    assert sender.deliver("host:1:a", "elsewhere", frame(4), attached={"commandId": "c4"}) is False
    assert len(listener.told) == 4


def test_delivery_to_a_gone_holder_fails(make_bus: MakeBus, redis_server: RedisServer) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    holder = make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    holder.stop()
    client = redis_server.client()
    try:
        assert wait_for(lambda: client.pubsub_numsub(holder.channel) == [(holder.channel, 0)])
    finally:
        client.close()
    assert sender.deliver("host:1:a", "m1", frame(1)) is False
    assert sender.live_instances(["host:1:a", "host:2:b"]) == {"host:2:b"}
    assert agent.frames == []


def test_a_holder_that_never_answers_is_not_delivered(make_bus: MakeBus, redis_server: RedisServer) -> None:
    sender = make_bus("host:2:b", timeout_s=0.3)
    silent = redis_server.client().pubsub()
    silent.subscribe(sender.channel_of("host:9:silent"))
    try:
        assert wait_for(lambda: sender.live_instances(["host:9:silent"]) == {"host:9:silent"})
        assert sender.deliver("host:9:silent", "m1", frame(1)) is False
    finally:
        silent.close()


def test_frames_of_one_machine_keep_their_order(make_bus: MakeBus) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    for n in range(50):
        sender.forward("host:1:a", "m1", frame(n))
    assert sender.deliver("host:1:a", "m1", frame(50)) is True
    assert [f["trace"]["stage"] for f in agent.frames] == [f"s{n}" for n in range(51)]


def test_a_blocked_agent_does_not_hold_up_other_machines(make_bus: MakeBus) -> None:
    release = threading.Event()

    class StuckAgent(FakeAgent):
        def send_json(self, frame: dict[str, Any]) -> bool:
            release.wait(10)
            return super().send_json(frame)

    holder_sessions = SessionRegistry()
    stuck = StuckAgent()
    holder_sessions.attach("slow", stuck)
    fast = attach(holder_sessions, "fast")
    make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    try:
        sender.forward("host:1:a", "slow", frame(1))
        assert sender.deliver("host:1:a", "fast", frame(2)) is True
        assert fast.frames == [frame(2)] and stuck.frames == []
    finally:
        release.set()
    assert wait_for(lambda: stuck.frames == [frame(1)])


def test_the_bus_comes_back_after_a_redis_restart(make_bus: MakeBus, redis_server: RedisServer) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    holder = make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    redis_server.stop()
    assert wait_for(lambda: not sender.connected and not holder.connected)
    assert sender.deliver("host:1:a", "m1", frame(1)) is False
    redis_server.start()
    assert sender.wait_connected(15) and holder.wait_connected(15)
    assert sender.deliver("host:1:a", "m1", frame(2)) is True
    assert agent.frames == [frame(2)]


def test_a_stopped_bus_delivers_nothing(make_bus: MakeBus) -> None:
    holder_sessions = SessionRegistry()
    agent = attach(holder_sessions, "m1")
    make_bus("host:1:a", holder_sessions)
    sender = make_bus("host:2:b")
    sender.stop()
    assert not sender.connected
    assert sender.deliver("host:1:a", "m1", frame(1)) is False
    sender.forward("host:1:a", "m1", frame(2))
    assert agent.frames == []

