"""Held trace frames under gunicorn: a real agent sees a callback's frames whole and in order."""
from __future__ import annotations

from pathlib import Path

from tests.cluster.harness import ClusterAgent, callback, wait_for
from tests.support.live_relay import live_relay


def test_a_callbacks_traces_reach_the_agent_in_order_around_its_command(tmp_path: Path) -> None:
    env = {"ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as relay, ClusterAgent("m1", [relay.agent_url], heartbeat_s=10) as agent:
        assert agent.wait_connected()
        assert wait_for(lambda: agent.frames("relay.trace"))  # agent_connected, sent when the hello ends
        reply = callback(relay, "@dev status", "m1", "u1")
        assert reply.json()["status"] == "sent_to_agent"

        expected = ["agent_connected", "command_received", "command", "command_dispatched", "passive_ack_sent",
                    "result_received", "result_ready_no_push"]
        assert wait_for(lambda: len(agent._frames) >= len(expected), timeout_s=10)
        seen = [f["trace"]["stage"] if f["type"] == "relay.trace" else f["type"] for f in agent._frames]
        assert seen == expected
