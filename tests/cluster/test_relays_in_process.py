"""Two relays in one process on one redis-server, each with its own bus: the lifecycle across processes.

Each ``create_app`` gets its own instance id, so the two relays route to each other exactly as two
gunicorn workers do, while the test drives agents and the clock directly.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from config.settings import load_settings
from relay.app import create_app
from relay.domains import audit
from relay.lifecycle import sweeps
from tests.lifecycle.conftest import BASE_ENV, Clock, FakeAgent, RelayHarness
from tests.support.redisproc import RedisServer

MakePair = Callable[..., tuple[RelayHarness, RelayHarness]]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def frame_kinds(agent: FakeAgent) -> list[str]:
    return [f["type"] if f["type"] != "relay.trace" else f["trace"]["stage"] for f in agent.frames]


@pytest.fixture
def make_pair(redis_server: RedisServer, tmp_path: Any) -> Iterator[MakePair]:
    built: list[RelayHarness] = []

    def build(**overrides: str) -> tuple[RelayHarness, RelayHarness]:
        clock = Clock()
        env = dict(BASE_ENV, STORE_BACKEND="redis", REDIS_URL=redis_server.url, **overrides)
        pair = []
        for name in ("a", "b"):
            settings = load_settings(dict(env, AUDIT_LOG_PATH=str(tmp_path / f"audit-{name}.jsonl")))
            harness = RelayHarness(create_app(settings, clock=clock, start_background=False), clock)
            built.append(harness)
            assert harness.relay.bus.start(wait_s=5)
            pair.append(harness)
        return pair[0], pair[1]

    yield build
    for harness in built:
        harness.relay.close()


def test_a_callback_on_one_process_reaches_the_agent_held_by_the_other(make_pair: MakePair) -> None:
    a, b = make_pair()
    agent = a.connect("m1")
    ack = b.callback("@dev fix the login bug", machineId="m1").get_json()
    assert ack["status"] == "sent_to_agent"
    command_id = ack["commandId"]
    assert wait_for(lambda: len(agent.frames) == 5)
    assert frame_kinds(agent) == ["agent_connected", "command_received", "command", "command_dispatched",
                                  "passive_ack_sent"]
    assert agent.of_type("command")[0]["command"]["commandId"] == command_id
    assert [i["commandId"] for i in a.client.get("/inflight").get_json()["items"]] == [command_id]

    a.result(agent, command_id, "ok", "Patch generated successfully")
    for relay in (a, b):
        assert relay.statuses(command_id) == ["created", "sent_to_agent", "agent_ok"]
        assert relay.client.get("/inflight").get_json() == {"items": []}
    assert b.callback("@dev status", machineId="m1").get_json()["locale"] == "en"


def test_cancel_and_retry_reach_an_agent_held_elsewhere(make_pair: MakePair) -> None:
    a, b = make_pair()
    agent = a.connect("m1")
    command_id = a.callback("@dev fix it", machineId="m1").get_json()["commandId"]
    reply = b.client.post(f"/commands/{command_id}/cancel")
    assert reply.get_json() == {"status": "cancel_sent", "commandId": command_id}
    assert agent.of_type("command.cancel")[0]["commandId"] == command_id

    retried = b.client.post(f"/commands/{command_id}/retry").get_json()
    assert retried["status"] == "retried_sent"
    assert agent.of_type("command")[-1]["command"]["commandId"] == retried["commandId"]
    assert a.statuses(retried["commandId"]) == ["retried_created", "sent_to_agent"]


def test_a_gone_holder_ends_commands_as_machine_offline(make_pair: MakePair) -> None:
    a, b = make_pair()
    agent = a.connect("m1")
    inflight_id = b.callback("@dev first", machineId="m1").get_json()["commandId"]
    a.relay.bus.stop()
    ack = b.callback("@dev second", machineId="m1").get_json()
    assert ack["status"] == "machine_offline"
    assert b.statuses(ack["commandId"]) == ["created", "machine_offline"]
    assert [i["commandId"] for i in b.client.get("/inflight").get_json()["items"]] == [inflight_id]
    reply = b.client.post(f"/commands/{inflight_id}/cancel")
    assert (reply.status_code, reply.get_json()) == (409, {"error": "machine_offline"})
    assert b.statuses(inflight_id)[-1] == "cancel_failed_machine_offline"
    assert b.client.post(f"/commands/{inflight_id}/retry").status_code == 409
    assert len(agent.of_type("command")) == 1


def test_one_process_leads_the_sweeps_and_another_takes_over(make_pair: MakePair) -> None:
    a, b = make_pair(SWEEP_INTERVAL_MS="100")
    a.connect("m1")
    command_id = a.callback("@dev fix", machineId="m1").get_json()["commandId"]
    a.clock.advance(a.relay.settings.inflight_command_timeout_ms + 1)
    assert a.relay.sweeper.run_once() is True
    assert b.relay.sweeper.run_once() is False
    assert a.statuses(command_id)[-1] == "inflight_timeout"

    a.connect("m1")  # the clock moved past the heartbeat timeout: a fresh hello
    second = a.callback("@dev again", machineId="m1").get_json()["commandId"]
    a.clock.advance(a.relay.settings.inflight_command_timeout_ms + 1)
    assert b.relay.sweeper.run_once() is False
    assert b.statuses(second)[-1] == "sent_to_agent"
    # the leader stops extending (as if it died): the lease expires and the other process takes over
    assert wait_for(b.relay.sweeper.run_once, timeout_s=5)
    assert b.statuses(second)[-1] == "inflight_timeout"
    assert a.relay.sweeper.run_once() is False
    b.relay.sweeper.stop()
    assert a.relay.sweeper.run_once() is True


def test_the_leader_removes_machine_records_of_gone_processes(make_pair: MakePair) -> None:
    a, b = make_pair()
    a.connect("m1")
    b.connect("m2")
    machines = lambda: [m["machineId"] for m in b.client.get("/machines").get_json()["items"]]  # noqa: E731
    assert machines() == ["m1", "m2"]
    b.relay.sweeper.run_once()
    assert machines() == ["m1", "m2"]
    a.relay.bus.stop()
    b.relay.sweeper.run_once()
    assert machines() == ["m2"]


def test_a_socket_superseded_on_another_process_is_closed(make_pair: MakePair) -> None:
    a, b = make_pair(SWEEP_INTERVAL_MS="1000")
    old = a.connect("m1")
    new = b.connect("m1")
    assert a.relay.sweeper.sweep_stale_sessions() == []  # within the grace period of its hello
    a.clock.advance(a.relay.settings.sweep_interval_ms)
    assert a.relay.sweeper.sweep_stale_sessions() == ["m1"]
    assert old.closed and not new.closed
    a.frame(lambda: a.relay.agent_events.on_disconnect(old))
    assert [m["machineId"] for m in a.client.get("/machines").get_json()["items"]] == ["m1"]
    assert a.callback("@dev status", machineId="m1").get_json()["status"] == "sent_to_agent"
    assert len(new.of_type("command")) == 1 and not old.of_type("command")


def test_an_answer_audited_by_a_process_that_died_before_claiming_is_not_timed_out(
        make_pair: MakePair, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_pair()
    agent = a.connect("m1")
    command_id = b.callback("@dev fix", machineId="m1").get_json()["commandId"]
    index = a.relay.agent_events.ctx.audit.index

    def killed(event: dict[str, Any], *_known_and_claimable: Any) -> None:
        # As where the audit write and the claim are two steps (a Redis Cluster: two slots).
        index.apply(event)
        raise SystemExit("killed between audit and claim")

    # ``a`` keeps the records ``b`` attached, and writes over them; without them it reads first.
    monkeypatch.setattr(index, "apply_to_known_then_claim", killed)
    monkeypatch.setattr(index, "apply_then_claim", killed)
    with pytest.raises(SystemExit):
        a.result(agent, command_id, "ok", "finished")
    monkeypatch.undo()
    assert a.statuses(command_id)[-1] == "agent_ok"
    assert [i["commandId"] for i in b.client.get("/inflight").get_json()["items"]] == [command_id]

    b.clock.advance(b.relay.settings.inflight_command_timeout_ms + 1)
    assert b.relay.sweeper.sweep_inflight() == []
    assert b.client.get("/inflight").get_json() == {"items": []}
    assert b.statuses(command_id) == ["created", "sent_to_agent", "agent_ok"]


def test_the_process_holding_the_agent_keeps_the_records_of_what_it_sent(make_pair: MakePair) -> None:
    """The holder handles the answer: a command sent through the bus leaves nothing with its sender,
    and the holder keeps the records the sender wrote, as the sender wrote them."""
    a, b = make_pair()
    agent = a.connect("m1")
    through_bus = b.callback("@dev status", machineId="m1").get_json()
    assert through_bus["status"] == "sent_to_agent"
    assert a.callback("@dev status", machineId="m1").get_json()["status"] == "sent_to_agent"
    assert wait_for(lambda: len(agent.of_type("command")) == 2)
    assert len(a.relay.agent_events.ctx.dispatched) == 2
    assert len(b.relay.agent_events.ctx.dispatched) == 0

    kept = a.relay.agent_events.ctx.dispatched.take(through_bus["commandId"])
    assert kept is not None
    for domain, entry in (("audit", kept.audit), ("inflight", kept.inflight)):
        store = b.relay.router.store(domain)
        assert entry.raw == store.store.get(store.key(through_bus["commandId"]))


def test_an_answer_another_process_recorded_first_is_decided_again_from_a_read(
        make_pair: MakePair, monkeypatch: pytest.MonkeyPatch) -> None:
    """``a`` dispatched the command and knows its records as written; ``b`` records the same answer
    first. ``a``'s write over what it knew finds the record changed, so ``a`` decides again from a
    read: the answer is recorded already and its command claimed, and the user is not told twice."""
    a, b = make_pair()
    agent = a.connect("m1")
    command_id = a.callback("@dev fix", machineId="m1").get_json()["commandId"]
    told: dict[str, list[str]] = {"a": [], "b": []}
    for name, relay in (("a", a), ("b", b)):
        monkeypatch.setattr(relay.relay.agent_events.notifier, "notify",
                            lambda user, summary, *args, _name=name, **kwargs: told[_name].append(summary))
    b.result(b.connect("m1"), command_id, "ok", "finished")
    a.result(agent, command_id, "ok", "finished")
    assert told == {"a": [], "b": ["finished"]}
    assert a.statuses(command_id) == ["created", "sent_to_agent", "agent_ok"]
    assert b.client.get("/inflight").get_json() == {"items": []}


def test_a_timeout_audited_by_a_leader_that_died_before_claiming_is_finished_by_the_next(
        make_pair: MakePair, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_pair()
    a.connect("m1")
    command_id = a.callback("@dev fix", machineId="m1").get_json()["commandId"]
    a.clock.advance(a.relay.settings.inflight_command_timeout_ms + 1)
    inflight = a.relay.agent_events.ctx.domains.inflight

    def killed(_command_id: str) -> None:
        raise SystemExit("killed between audit and claim")

    monkeypatch.setattr(inflight, "claim", killed)
    with pytest.raises(SystemExit):
        a.frame(a.relay.sweeper.sweep_inflight)
    monkeypatch.undo()
    assert [i["commandId"] for i in b.client.get("/inflight").get_json()["items"]] == [command_id]
    assert b.frame(b.relay.sweeper.sweep_inflight) == [command_id]
    assert b.statuses(command_id) == ["created", "sent_to_agent", "inflight_timeout"]
    assert b.client.get("/inflight").get_json() == {"items": []}


def test_the_sweeps_leader_links_the_audit_records_for_filtered_listings(make_pair: MakePair) -> None:
    """The records either process wrote are linked by the leader's sweep; a filtered listing on the
    other process answers through the links as before them."""
    a, b = make_pair()
    agent = a.connect("m1")
    mine = []
    for relay, user in ((a, "u1"), (b, "u2"), (b, "u1"), (a, "u2")):
        a.clock.advance(10)
        mine.append(relay.callback("@dev status", user_id=user, machineId="m1").get_json()["commandId"])
    a.clock.advance(10)
    a.result(agent, mine[0], "ok", "done")
    before = {user: b.client.get(f"/audit/recent?userId={user}").get_json() for user in ("u1", "u2")}
    assert [r["commandId"] for r in before["u1"]["items"]] == [mine[0], mine[2]]  # mine[0] answered last

    a.clock.advance(audit.LINK_LAG_MS + 1)
    assert a.relay.sweeper.run_once()
    assert b.frame(lambda: b.relay.agent_events.ctx.domains.audit.link(b.clock())) == 0  # nothing left
    for user in ("u1", "u2"):
        assert b.client.get(f"/audit/recent?userId={user}").get_json() == before[user]
    assert [r["commandId"] for r in b.client.get("/audit/recent?status=agent_ok").get_json()["items"]] == [mine[0]]


def _watermark(relay: RelayHarness) -> float:
    store = relay.relay.router.store("audit")
    return store.watermark(audit.INDEX) or 0.0


def test_between_periods_the_last_periods_leader_links_every_few_seconds(
        make_pair: MakePair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filtered listings read the records written since the last link, so the leader links more
    often than it sweeps; a process that did not lead the last period does not."""
    monkeypatch.setattr(sweeps, "LINK_INTERVAL_S", 0.05)
    a, b = make_pair()
    a.connect("m1")
    assert a.relay.sweeper.run_once() and not b.relay.sweeper.run_once()
    first = _watermark(a)
    a.clock.advance(1000)
    b.callback("@dev status", machineId="m1")
    a.clock.advance(1000)

    b.relay.sweeper.link_audit()
    assert _watermark(a) == first
    b.relay.sweeper.start()
    a.relay.sweeper.start()  # SWEEP_INTERVAL_MS is 60 s: these are links between periods
    try:
        assert wait_for(lambda: _watermark(b) == a.clock() - audit.LINK_LAG_MS)
    finally:
        a.relay.sweeper.stop()
        b.relay.sweeper.stop()
