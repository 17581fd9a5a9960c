"""Redis round trips of one callback, counted on the relay's own connections (a ``redis.Connection``
that counts ``send_packed_command``: one call per command or per pipeline).

The hot path (an accepted ``@dev status`` for a machine whose agent is attached, ``redis-primary``)
must stay at two round trips: the rate-limit hit with the msgId reservation and the locale and
machine reads, then the template, audit record and in-flight record written together before the
command goes to the agent. The agent's result for it takes one on the process holding the agent,
where the command was dispatched or delivered through the bus (two where its records are not known). Timings are not asserted anywhere;
this count is what a regression breaks.
"""
from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.settings import load_settings
from middleware.breaker import GuardedBreaker
from relay.app import create_app
from relay.lifecycle.context import HYDRATE_CHUNK
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.lifecycle.conftest import FakeAgent
from tests.support.redisproc import RedisServer

HOT_PATH_ROUND_TRIPS = 2
#: An agent's result on the process that dispatched its command: the audit record written over what
#: that process wrote, with its index entry and the locale, and the in-flight record claimed by the
#: same script.
RESULT_ROUND_TRIPS = 1
#: On a process that did not dispatch it: the in-flight and audit records read together first.
RESULT_ROUND_TRIPS_FROM_A_READ = 2


class CountingConnection(redis.Connection):
    """Counts what it sends: each ``send_packed_command`` is one round trip; ``gets`` counts the
    ``GET`` commands in them (not those that scripts make on the server)."""

    lock = threading.Lock()
    total = 0
    gets = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        payload = b"".join(command) if isinstance(command, list) else bytes(command)
        with CountingConnection.lock:
            CountingConnection.total += 1
            CountingConnection.gets += len(_GET.findall(payload))
        super().send_packed_command(command, check_health)


_GET = re.compile(rb"\*\d+\r\n\$3\r\nGET\r\n")


class Relay:
    def __init__(self, server: RedisServer, tmp_path: Any, **env: str) -> None:
        settings = load_settings({
            "ALLOWLIST_USERS": "u1,u2", "STORE_PHASE": "redis-primary", "REDIS_URL": server.url,
            "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"), **env})
        client = redis.Redis.from_url(server.url, decode_responses=True, connection_class=CountingConnection)
        self.redis = RedisStore(lambda: client, breaker=GuardedBreaker(fail_max=5, reset_timeout=5))
        self.app = create_app(settings, backends={"memory": MemoryStore(), "redis": self.redis},
                              start_background=False)
        self.relay = self.app.extensions["relay"]
        self.client = self.app.test_client()

    def connect(self, machine_id: str) -> FakeAgent:
        agent = FakeAgent()
        with self.relay.router.bound():
            self.relay.agent_events.on_hello(agent, {"type": "agent.hello", "machineId": machine_id})
        return agent

    def callback(self, text: str = "@dev status", machine_id: str = "m1", msg_id: str = "") -> tuple[dict, int]:
        """The ack and the round trips the request made."""
        before = CountingConnection.total
        reply = self.client.post("/wecom/callback", json={"msgId": msg_id or uuid.uuid4().hex, "userId": "u1",
                                                           "machineId": machine_id, "text": text})
        assert reply.status_code == 200
        return reply.get_json(), CountingConnection.total - before

    def record(self, command_id: str) -> dict:
        return self.client.get(f"/commands/{command_id}").get_json()


@pytest.fixture
def relay(redis_server: RedisServer, tmp_path: Any) -> Iterator[Relay]:
    built = Relay(redis_server, tmp_path)
    yield built
    built.relay.close()


def test_an_accepted_callback_takes_two_round_trips(relay: Relay) -> None:
    agent = relay.connect("m1")
    relay.callback()  # the first call opens the connection (and checks the data-loss marker)
    ack, round_trips = relay.callback()
    assert ack["status"] == "sent_to_agent"
    assert round_trips == HOT_PATH_ROUND_TRIPS
    assert agent.of_type("command")[-1]["command"]["commandId"] == ack["commandId"]
    record = relay.record(ack["commandId"])
    assert [e["status"] for e in record["events"]] == ["created", "sent_to_agent"]
    inflight = relay.client.get("/inflight").get_json()["items"]
    assert ack["commandId"] in [item["commandId"] for item in inflight]


def test_a_duplicate_takes_one_round_trip(relay: Relay) -> None:
    relay.connect("m1")
    relay.callback()
    relay.callback(msg_id="dup")
    ack, round_trips = relay.callback(msg_id="dup")
    assert ack["status"] == "duplicate_ignored"
    assert round_trips == 1


def test_an_offline_machine_takes_two_round_trips(relay: Relay) -> None:
    relay.connect("m1")
    relay.callback()
    ack, round_trips = relay.callback(machine_id="m2")
    assert ack["status"] == "machine_offline"
    assert round_trips == 2
    assert [e["status"] for e in relay.record(ack["commandId"])["events"]] == ["created", "machine_offline"]


def test_over_the_rate_limit_takes_one_round_trip_and_reserves_nothing(redis_server: RedisServer,
                                                                       tmp_path: Any) -> None:
    limited = Relay(redis_server, tmp_path, RATE_LIMIT_PER_MINUTE="1")
    try:
        limited.connect("m1")
        limited.callback()
        before = CountingConnection.total
        reply = limited.client.post("/wecom/callback", json={"msgId": "late", "userId": "u1", "machineId": "m1",
                                                              "text": "@dev status"})
        assert reply.status_code == 429
        assert CountingConnection.total - before == 1
        assert redis_server.client().keys("*idempotency*late*") == []
    finally:
        limited.relay.close()


def _answer(relay: Relay, agent: FakeAgent, command_id: str) -> tuple[int, int]:
    """The agent's result for ``command_id``: the round trips and ``GET``s its handling made."""
    frame = {"type": "agent.result", "result": {"commandId": command_id, "machineId": "m1",
                                                "status": "ok", "summary": "all good"}}
    before, gets = CountingConnection.total, CountingConnection.gets
    with relay.relay.router.bound(fresh=True):
        relay.relay.agent_events.on_result(agent, frame)
    counted = CountingConnection.total - before, CountingConnection.gets - gets
    assert relay.record(command_id)["status"] == "agent_ok"
    assert command_id not in [item["commandId"] for item in relay.client.get("/inflight").get_json()["items"]]
    return counted


def test_an_agent_result_takes_one_round_trip_and_reads_nothing(relay: Relay) -> None:
    """The process that dispatched the command writes over the records as it wrote them."""
    agent = relay.connect("m1")
    relay.callback()
    ack, _ = relay.callback()
    assert _answer(relay, agent, ack["commandId"]) == (RESULT_ROUND_TRIPS, 0)


def test_an_agent_result_the_process_did_not_dispatch_reads_each_record_once(relay: Relay) -> None:
    """The in-flight and audit records are prefetched together, and the reads that follow take the
    prefetches' answers: two ``GET``s for the result."""
    agent = relay.connect("m1")
    relay.callback()
    ack, _ = relay.callback()
    relay.relay.agent_events.ctx.dispatched.forget(ack["commandId"])  # as on another process
    assert _answer(relay, agent, ack["commandId"]) == (RESULT_ROUND_TRIPS_FROM_A_READ, 2)


def test_an_agent_result_takes_one_round_trip_where_its_command_came_through_the_bus(
        redis_server: RedisServer, tmp_path: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A callback on another process reaches the agent through the bus with the records it wrote,
    and the process holding the agent writes the answer over them: one round trip, no read."""
    holder = Relay(redis_server, tmp_path)
    sender = Relay(redis_server, tmp_path_factory.mktemp("sender"))
    try:
        for relay in (holder, sender):
            assert relay.relay.bus.start(wait_s=5)
        agent = holder.connect("m1")
        sender.callback()
        ack, _ = sender.callback()
        assert ack["status"] == "sent_to_agent"
        assert agent.of_type("command")[-1]["command"]["commandId"] == ack["commandId"]
        assert _answer(holder, agent, ack["commandId"]) == (RESULT_ROUND_TRIPS, 0)
    finally:
        sender.relay.close()
        holder.relay.close()


def _startup_round_trips(server: RedisServer, log_dir: Any) -> tuple[Relay, int]:
    before = CountingConnection.total
    started = Relay(server, log_dir, RATE_LIMIT_PER_MINUTE="1000")
    return started, CountingConnection.total - before


def test_a_restart_replays_the_audit_log_in_one_round_trip_per_chunk_of_commands(
        redis_server: RedisServer, tmp_path: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Over an intact index nothing is written, and 250 commands (500 logged events) are read in
    two round trips of up to ``HYDRATE_CHUNK`` commands each."""
    first, _ = _startup_round_trips(redis_server, tmp_path)
    offline = [first.callback(machine_id="offline-box")[0]["commandId"] for _ in range(250)]
    first.relay.close()
    without_log, overhead = _startup_round_trips(redis_server, tmp_path_factory.mktemp("no-log"))
    without_log.relay.close()

    restarted, round_trips = _startup_round_trips(redis_server, tmp_path)
    try:
        assert HYDRATE_CHUNK == 200
        assert round_trips - overhead == 2
        for command_id in (offline[0], offline[-1]):
            assert [e["status"] for e in restarted.record(command_id)["events"]] == ["created", "machine_offline"]
    finally:
        restarted.relay.close()
