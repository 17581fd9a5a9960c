"""Where a result's push runs: on the pool when a WeCom API or webhook is configured, at once otherwise."""
from __future__ import annotations

import threading

from tests.lifecycle.conftest import RelayHarness


def _dispatched(relay: RelayHarness):
    agent = relay.connect("m1")
    command_id = relay.callback("@dev status", machineId="m1").get_json()["commandId"]
    return agent, command_id


def test_without_a_push_target_the_trace_is_sent_by_the_result_frame(relay: RelayHarness) -> None:
    agent, command_id = _dispatched(relay)
    relay.result(agent, command_id, "ok", "all green")
    assert agent.stages()[-2:] == ["result_received", "result_ready_no_push"]
    assert relay.relay.notifier._pool._threads == set()


def test_a_push_target_runs_on_the_pool_and_leaves_the_frame_free(relay: RelayHarness) -> None:
    release = threading.Event()
    pushed: list[tuple[str, str]] = []

    def slow_wecom(user_id: str, content: str) -> None:
        release.wait(5)
        pushed.append((user_id, content))

    relay.relay.notifier.wecom = slow_wecom
    agent, command_id = _dispatched(relay)
    relay.result(agent, command_id, "ok", "all green")
    assert agent.stages()[-1] == "result_received"
    assert pushed == []
    release.set()
    relay.drain()
    assert [user for user, _ in pushed] == ["u1"]
    assert agent.stages()[-1] == "result_push_ok"


def test_a_push_carried_out_at_once_returns_a_completed_future(relay: RelayHarness) -> None:
    notifier = relay.relay.notifier
    done = notifier.notify("u1", "all green", "ok", command_id=None, machine_id="m1", kind="status")
    assert done.done() and done.result() is None
    again = notifier.notify("u1", "all green", "ok", command_id=None, machine_id="m1", kind="status")
    assert again.done() and again.result() is None
