"""The command lifecycle end to end in one process, in memory and Redis mode (reference §4, §6, §7)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.lifecycle.conftest import FakeAgent, RelayHarness


def test_dispatch_result_and_audit(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    assert agent.stages() == ["agent_connected"]
    reply = relay.callback("@dev fix the login bug", machineId="m1")
    ack = reply.get_json()
    assert reply.status_code == 200
    assert list(ack) == ["status", "commandId", "passiveMessage", "locale"]
    assert ack["status"] == "sent_to_agent" and ack["locale"] == "zh-CN"
    command_id = ack["commandId"]
    types = [f["type"] if f["type"] != "relay.trace" else f["trace"]["stage"] for f in agent.frames]
    assert types == ["agent_connected", "command_received", "command", "command_dispatched", "passive_ack_sent"]
    command = agent.of_type("command")[0]["command"]
    assert command["prompt"] == "fix the login bug" and command["kind"] == "task" and command["userId"] == "u1"
    assert [i["commandId"] for i in relay.client.get("/inflight").get_json()["items"]] == [command_id]

    relay.result(agent, command_id, "ok", "Diff proposal ready: 1 file")
    relay.drain()
    assert relay.statuses(command_id) == ["created", "sent_to_agent", "agent_ok"]
    record = relay.record(command_id)
    assert record["status"] == "agent_ok" and record["summary"] == "Diff proposal ready: 1 file"
    assert relay.client.get("/inflight").get_json() == {"items": []}
    assert "result_ready_no_push" in agent.stages()


def test_offline_machine_is_audited_and_not_inflight(relay: RelayHarness) -> None:
    reply = relay.callback("@dev status", machineId="dev-machine-1").get_json()
    assert list(reply) == ["status", "machineId", "commandId", "locale"]
    assert reply["status"] == "machine_offline"
    assert relay.statuses(reply["commandId"]) == ["created", "machine_offline"]
    assert relay.client.get("/inflight").get_json() == {"items": []}


def test_duplicate_msg_id_dispatches_once(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    first = relay.callback("@dev status", msg_id="dup-1", machineId="m1").get_json()
    second = relay.callback("@dev status", msg_id="dup-1", machineId="m1").get_json()
    assert first["status"] == "sent_to_agent"
    assert second == {"status": "duplicate_ignored", "locale": "zh-CN"}
    assert len(agent.of_type("command")) == 1
    assert "duplicate_ignored" in agent.stages()


def test_gates_in_reference_order(make_relay) -> None:
    relay = make_relay(RATE_LIMIT_PER_MINUTE="2")
    assert relay.callback("hi", user_id="stranger", machineId="m1").status_code == 403
    assert relay.callback("hi", user_id="stranger", machineId="m1").status_code == 403
    reply = relay.callback("hi", user_id="stranger", machineId="m1")
    assert (reply.status_code, reply.get_json()) == (429, {"error": "rate_limited"})
    assert relay.callback("hi").get_json() == {"error": "missing_machine_id"}
    assert relay.callback("hi", user_id="zhangsan", machineId="m2").get_json() == {"error": "machine_binding_mismatch"}
    assert relay.client.post("/wecom/callback", json={"userId": "u1", "text": "x"}).get_json() == {
        "error": "invalid_payload"}
    assert relay.callback("@dev   ", machineId="m1", user_id="u2").get_json() == {
        "status": "ignored_non_dev_message", "locale": "zh-CN"}


def test_failed_callback_releases_its_msg_id(relay: RelayHarness, monkeypatch) -> None:
    templates = relay.relay.agent_events.ctx.domains.templates
    real_put = templates.put

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(templates, "put", real_put)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(templates, "put", fail_once)
    assert relay.callback("@dev status", msg_id="retry-me", machineId="m1").status_code == 500
    reply = relay.callback("@dev status", msg_id="retry-me", machineId="m1").get_json()
    assert reply["status"] == "machine_offline"  # WeCom's retry is processed, not swallowed as a duplicate


def test_audit_file_failure_does_not_fail_the_callback(make_relay, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the audit directory should be")
    relay = make_relay(AUDIT_LOG_PATH=str(blocked / "audit.jsonl"))
    reply = relay.callback("@dev status", machineId="m1")
    assert reply.status_code == 200
    assert relay.statuses(reply.get_json()["commandId"]) == ["created", "machine_offline"]


def test_cancel_and_retry(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    command_id = relay.callback("@dev fix it", machineId="m1").get_json()["commandId"]
    assert relay.client.post(f"/commands/{command_id}/cancel", json={"userId": "u2"}).status_code == 403
    reply = relay.client.post(f"/commands/{command_id}/cancel")
    assert reply.get_json() == {"status": "cancel_sent", "commandId": command_id}
    assert agent.of_type("command.cancel")[0]["commandId"] == command_id
    assert relay.client.post("/commands/nope/cancel").get_json() == {"error": "command_not_inflight"}

    retried = relay.client.post(f"/commands/{command_id}/retry", json={"userId": "u1"}).get_json()
    assert retried["status"] == "retried_sent" and retried["retriedFrom"] == command_id
    new_id = retried["commandId"]
    resent = agent.of_type("command")[-1]["command"]
    assert resent["commandId"] == new_id and resent["prompt"] == "fix it"
    assert relay.statuses(new_id) == ["retried_created", "sent_to_agent"]
    assert relay.record(new_id)["events"][0]["metadata"] == {"retriedFrom": command_id}
    assert relay.client.post("/commands/nope/retry").get_json() == {"error": "command_not_found_for_retry"}


def test_cancel_offline_is_audited(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    command_id = relay.callback("@dev fix it", machineId="m1").get_json()["commandId"]
    relay.frame(lambda: relay.relay.agent_events.on_disconnect(agent))
    reply = relay.client.post(f"/commands/{command_id}/cancel")
    assert (reply.status_code, reply.get_json()) == (409, {"error": "machine_offline"})
    assert relay.statuses(command_id)[-1] == "cancel_failed_machine_offline"
    assert relay.client.post(f"/commands/{command_id}/retry").status_code == 409


def test_newer_hello_replaces_and_closes_older_socket(relay: RelayHarness) -> None:
    old = relay.connect("m1")
    new = relay.connect("m1")
    assert old.closed and not new.closed
    relay.frame(lambda: relay.relay.agent_events.on_disconnect(old))
    assert [m["machineId"] for m in relay.client.get("/machines").get_json()["items"]] == ["m1"]
    assert relay.callback("@dev status", machineId="m1").get_json()["status"] == "sent_to_agent"
    assert len(new.of_type("command")) == 1 and not old.of_type("command")


def test_send_to_closed_socket_is_offline_not_lost(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    agent.closed = True
    reply = relay.callback("@dev status", machineId="m1").get_json()
    assert reply["status"] == "machine_offline"
    assert relay.client.get("/inflight").get_json() == {"items": []}


def test_socket_speaks_only_for_its_machine(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    other = relay.connect("m2")
    command_id = relay.callback("@dev status", machineId="m2").get_json()["commandId"]
    relay.result(agent, command_id, "ok", "spoofed", machine_id="m2")
    assert relay.statuses(command_id) == ["created", "sent_to_agent"]
    before = relay.frame(lambda: relay.relay.agent_events.ctx.domains.machines.get("m2"))
    relay.clock.advance(1000)
    relay.frame(lambda: relay.relay.agent_events.on_heartbeat(agent, {"machineId": "m2", "runningCount": 9}))
    after = relay.frame(lambda: relay.relay.agent_events.ctx.domains.machines.get("m2"))
    assert after == before
    relay.result(other, command_id, "ok", "real")
    assert relay.statuses(command_id)[-1] == "agent_ok"


def test_heartbeat_updates_counts_and_restores_expired_record(make_relay) -> None:
    relay = make_relay(MACHINE_HEARTBEAT_TIMEOUT_MS="1000")
    agent = relay.connect("m1")
    relay.frame(lambda: relay.relay.agent_events.on_heartbeat(agent, {"machineId": "m1", "runningCount": 1,
                                                                      "pendingCount": 2}))
    item = relay.client.get("/machines").get_json()["items"][0]
    assert (item["runningCount"], item["pendingCount"], item["stale"]) == (1, 2, False)
    relay.clock.advance(1500)
    assert relay.client.get("/machines").get_json()["items"][0]["stale"] is True
    relay.frame(lambda: relay.relay.agent_events.on_heartbeat(agent, {"machineId": "m1"}))
    item = relay.client.get("/machines").get_json()["items"][0]
    assert (item["runningCount"], item["stale"]) == (1, False)


def test_final_status_never_goes_backwards(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    command_id = relay.callback("@dev fix", machineId="m1").get_json()["commandId"]
    relay.result(agent, command_id, "ok", "finished")
    ctx = relay.relay.agent_events.ctx
    relay.frame(lambda: ctx.audit.record(ctx.event(command_id, "result_push_failed", userId="u1", machineId="m1")))
    relay.frame(lambda: ctx.audit.record(ctx.event(command_id, "sent_to_agent", userId="u1", machineId="m1")))
    record = relay.record(command_id)
    assert record["status"] == "agent_ok"
    assert [e["status"] for e in record["events"]][-2:] == ["result_push_failed", "sent_to_agent"]


def test_result_for_unknown_command_notifies_bound_user(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    relay.result(agent, "local-1", "error", "local only")
    relay.drain()
    record = relay.record("local-1")
    assert record["status"] == "agent_error" and record["userId"] == "zhangsan"


def test_inflight_timeout_sweep(relay: RelayHarness) -> None:
    relay.connect("m1")
    command_id = relay.callback("@dev fix", machineId="m1").get_json()["commandId"]
    relay.clock.advance(relay.relay.settings.inflight_command_timeout_ms + 1)
    relay.relay.sweeper.run_once()
    relay.drain()
    assert relay.statuses(command_id)[-1] == "inflight_timeout"
    assert relay.client.get("/inflight").get_json() == {"items": []}


def test_locale_follows_results(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    command_id = relay.callback("@dev fix", machineId="m1").get_json()["commandId"]
    relay.result(agent, command_id, "ok", "Patch generated successfully for README")
    ack = relay.callback("@dev status", machineId="m1").get_json()
    assert ack["locale"] == "en" and ack["passiveMessage"] == "Command received and dispatched to local agent."


def test_hydration_never_duplicates_events(make_relay) -> None:
    first = make_relay()
    agent = first.connect("m1")
    command_id = first.callback("@dev fix", machineId="m1").get_json()["commandId"]
    first.result(agent, command_id, "ok", "done")
    first.drain()
    log_path = Path(first.relay.settings.audit_log_path)
    lines = log_path.read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["created", "sent_to_agent", "agent_ok"]
    for _ in range(2):
        again = make_relay()
        assert again.statuses(command_id) == ["created", "sent_to_agent", "agent_ok"]
    assert log_path.read_text().splitlines() == lines


def test_hydration_keeps_each_command_s_events_in_file_order(make_relay) -> None:
    """The log interleaves commands; hydration replays it command by command (``AuditTrail.hydrate``)."""
    log_path = Path(make_relay().relay.settings.audit_log_path)
    lines = [("a", "created"), ("b", "created"), ("a", "sent_to_agent"), ("b", "machine_offline"), ("a", "agent_ok")]
    log_path.write_text("".join(
        json.dumps({"commandId": command_id, "timestamp": f"2026-11-26T10:00:0{second}.000Z", "status": status,
                    "userId": "u1", "machineId": "m1"}) + "\n"
        for second, (command_id, status) in enumerate(lines)))

    restarted = make_relay()

    assert restarted.statuses("a") == ["created", "sent_to_agent", "agent_ok"]
    assert restarted.statuses("b") == ["created", "machine_offline"]
    assert restarted.record("a")["status"] == "agent_ok"


def test_audit_recent_filters_and_metrics(relay: RelayHarness) -> None:
    agent = relay.connect("m1")
    ids = []
    for text in ("@dev one", "@dev two", "@dev three"):
        ids.append(relay.callback(text, machineId="m1").get_json()["commandId"])
        relay.clock.advance(10)
    relay.result(agent, ids[0], "error", "failed")
    relay.callback("@dev status", machineId="offline-box")
    items = relay.client.get("/audit/recent?limit=2").get_json()["items"]
    assert len(items) == 2 and items[0]["updatedAt"] >= items[1]["updatedAt"]
    only = relay.client.get("/audit/recent?status=agent_error&userId=u1").get_json()["items"]
    assert [r["commandId"] for r in only] == [ids[0]]
    metrics = relay.client.get("/metrics").get_json()
    assert metrics["inflight"] == {"total": 2}
    assert metrics["audit"]["records"] == 4
    assert metrics["audit"]["byStatus"] == {"agent_error": 1, "sent_to_agent": 2, "machine_offline": 1}
    assert metrics["machines"] == {"totalConnected": 1, "stale": 0}


def test_state_survives_restart_in_redis_mode(make_relay, mode: str) -> None:
    first = make_relay()
    agent = first.connect("m1")
    command_id = first.callback("@dev fix", msg_id="once", machineId="m1").get_json()["commandId"]
    second = make_relay(AUDIT_LOG_PATH="")
    agent2 = FakeAgent()
    second.frame(lambda: second.relay.agent_events.on_hello(agent2, {"machineId": "m1"}))
    duplicate = second.callback("@dev fix", msg_id="once", machineId="m1").get_json()
    retried = second.client.post(f"/commands/{command_id}/retry").get_json()
    if mode == "redis":
        assert duplicate["status"] == "duplicate_ignored"
        assert retried["status"] == "retried_sent"
        second.result(agent2, command_id, "ok", "late result")
        assert second.statuses(command_id) == ["created", "sent_to_agent", "agent_ok"]
    else:
        assert duplicate["status"] == "sent_to_agent"
        assert retried == {"error": "command_not_found_for_retry"}
    assert agent.frames
