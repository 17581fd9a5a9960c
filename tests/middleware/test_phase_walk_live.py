"""The whole migration walked on a live relay: every phase forward and back to memory, by PUT
/ops/store/flags, with an agent attached and callbacks flowing. Nothing accepted may be lost, no
msgId may be dispatched twice, and every command's audit must be complete."""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.cluster.harness import ClusterAgent, wait_for
from tests.support.live_relay import LiveRelay, live_relay
from tests.support.redisproc import RedisServer

TOKEN = "walk-admin"
ADMIN = {"x-admin-token": TOKEN}
FORWARD = ["memory", "dual-write", "shadow", "redis-read", "rampdown", "redis-primary"]
WALK = FORWARD + FORWARD[-2::-1]  # ... redis-primary, rampdown, ..., memory


@pytest.fixture
def relay(redis_server: RedisServer, tmp_path: Any) -> Iterator[LiveRelay]:
    env = {"REDIS_URL": redis_server.url, "STORE_PHASE": "memory", "RELAY_ADMIN_TOKEN": TOKEN,
           "ALLOWLIST_USERS": "walker", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"),
           "RATE_LIMIT_PER_MINUTE": "100000", "STORE_SHADOW_SAMPLE_RATE": "1"}
    with live_relay("wsgi:app", env=env) as live:
        yield live


class Traffic:
    """Sends callbacks with new msgIds and, every third time, repeats an earlier msgId."""

    def __init__(self, relay: LiveRelay) -> None:
        self.relay = relay
        self.acks: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._session = requests.Session()

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            msg_id = f"walk-{n // 3 * 2}" if n % 3 == 2 else f"walk-{n}"
            body = {"msgId": msg_id, "userId": "walker", "machineId": "walk-box", "text": f"@dev task {n}"}
            try:
                reply = self._session.post(self.relay.url("/wecom/callback"), json=body, timeout=5)
            except requests.RequestException as exc:
                self.errors.append(type(exc).__name__)
                continue
            if reply.status_code != 200:
                self.errors.append(f"{reply.status_code} {reply.text[:100]}")
                continue
            self.acks.append((msg_id, reply.json()))
            time.sleep(0.01)


def put_phase(relay: LiveRelay, phase: str) -> None:
    reply = requests.put(relay.url("/ops/store/flags"), json={"STORE_PHASE": phase}, headers=ADMIN, timeout=5)
    assert reply.status_code == 200, reply.text
    status = requests.get(relay.url("/ops/store"), headers=ADMIN, timeout=5).json()
    assert {d["flags"]["phase"] for d in status["domains"].values()} == {phase}


def test_every_phase_forward_and_back_loses_and_duplicates_nothing(relay: LiveRelay) -> None:
    with ClusterAgent("walk-box", [relay.agent_url], heartbeat_s=0.5) as agent:
        assert agent.wait_connected()
        with Traffic(relay) as traffic:
            for phase in WALK:
                put_phase(relay, phase)
                before = len(traffic.acks)
                assert wait_for(lambda: len(traffic.acks) >= before + 15, timeout_s=15), phase
        sent = {ack["commandId"]: msg_id for msg_id, ack in traffic.acks if ack["status"] == "sent_to_agent"}
        assert not traffic.errors
        assert wait_for(lambda: len(agent.commands()) >= len(sent), timeout_s=10)

    # No msgId dispatched twice: one accepted command per msgId, and the agent got each once.
    accepted_msg_ids = list(sent.values())
    assert len(accepted_msg_ids) == len(set(accepted_msg_ids))
    duplicates = [msg_id for msg_id, ack in traffic.acks if ack["status"] == "duplicate_ignored"]
    assert duplicates and set(duplicates) <= set(accepted_msg_ids)
    received = [c["commandId"] for c in agent.commands()]
    assert sorted(received) == sorted(sent)

    # Nothing lost: every accepted command has its whole audit, answered by the agent.
    def complete(command_id: str) -> bool:
        reply = requests.get(relay.url(f"/commands/{command_id}"), headers=ADMIN, timeout=5)
        if reply.status_code != 200:
            return False
        record = reply.json()
        # A fast agent's result may be audited before sent_to_agent; the status never goes back.
        return record["status"] == "agent_ok" and sorted(e["status"] for e in record["events"]) == [
            "agent_ok", "created", "sent_to_agent"]

    missing = [c for c in sent if not wait_for(lambda c=c: complete(c), timeout_s=5)]
    assert missing == []
    store = requests.get(relay.url("/ops/store"), headers=ADMIN, timeout=5).json()
    assert all(d["flags"]["phase"] == "memory" for d in store["domains"].values())
