"""An in-process relay (Flask test client) with fake agent sockets, in memory or Redis mode."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from config.settings import load_settings
from relay.app import create_app


class FakeAgent:
    """Stands in for an agent's WebSocket: records the frames the relay sends."""

    def __init__(self, machine_id: Optional[str] = None) -> None:
        self.session_id = str(uuid.uuid4())
        self.machine_id = machine_id
        self.frames: list[dict[str, Any]] = []
        self.closed = False
        self.hello_as = machine_id

    def send_json(self, frame: dict[str, Any]) -> bool:
        if self.closed:
            return False
        self.frames.append(frame)
        return True

    def close(self, reason: str = "") -> None:
        self.closed = True

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == type_]

    def stages(self) -> list[str]:
        return [f["trace"]["stage"] for f in self.of_type("relay.trace")]


class Clock:
    def __init__(self, start_ms: int = 1_790_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class RelayHarness:
    def __init__(self, app: Any, clock: Clock) -> None:
        self.app = app
        self.relay = app.extensions["relay"]
        self.client = app.test_client()
        self.clock = clock

    def connect(self, machine_id: str = "m1") -> FakeAgent:
        agent = FakeAgent()
        self.frame(lambda: self.relay.agent_events.on_hello(agent, {"type": "agent.hello", "machineId": machine_id}))
        return agent

    def frame(self, call: Any) -> Any:
        with self.relay.router.bound():
            return call()

    def result(self, agent: FakeAgent, command_id: str, status: str = "ok", summary: str = "done",
               machine_id: Optional[str] = None) -> None:
        frame = {"type": "agent.result", "result": {"commandId": command_id, "machineId": machine_id or agent.machine_id,
                                                    "status": status, "summary": summary,
                                                    "createdAt": "2026-01-01T00:00:00.000Z"}}
        self.frame(lambda: self.relay.agent_events.on_result(agent, frame))

    def callback(self, text: str, msg_id: Optional[str] = None, user_id: str = "u1", **extra: Any) -> Any:
        body = {"msgId": msg_id or uuid.uuid4().hex, "userId": user_id, "text": text, **extra}
        return self.client.post("/wecom/callback", json=body)

    def record(self, command_id: str) -> Any:
        return self.client.get(f"/commands/{command_id}").get_json()

    def statuses(self, command_id: str) -> list[str]:
        return [e["status"] for e in self.record(command_id)["events"]]

    def drain(self) -> None:
        """Wait for queued result pushes."""
        self.relay.notifier.shutdown(wait=True)


BASE_ENV = {"ALLOWLIST_USERS": "u1,u2,zhangsan", "MACHINE_BINDINGS": "zhangsan:m1"}


@pytest.fixture(params=["memory", "redis"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_relay(mode: str, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Build relays sharing one audit file (and, in Redis mode, one redis-server)."""
    env = dict(BASE_ENV, AUDIT_LOG_PATH=str(tmp_path / "audit.jsonl"))
    if mode == "redis":
        server = request.getfixturevalue("redis_server")
        env.update(STORE_BACKEND="redis", REDIS_URL=server.url)
    built: list[RelayHarness] = []

    def build(clock: Optional[Clock] = None, **overrides: str) -> RelayHarness:
        clock = clock or Clock()
        settings = load_settings({**env, **overrides})
        harness = RelayHarness(create_app(settings, clock=clock, start_background=False), clock)
        built.append(harness)
        return harness

    yield build
    for harness in built:
        harness.relay.close()


@pytest.fixture
def relay(make_relay: Any) -> RelayHarness:
    return make_relay()
