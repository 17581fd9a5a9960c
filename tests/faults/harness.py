"""Live fault scenarios: a relay under gunicorn whose Redis is reached through a ``FaultProxy``,
steady callback traffic with latencies recorded per phase, an agent that answers, and the
invariants every scenario checks at its end:

* no accepted command lost: each ends with a terminal audit status, or is still in flight;
* no msgId dispatched twice: at most one command per msgId, and the agent got each command once;
* no relay process crash or wedge: the same workers, ``/healthz`` answering at once;
* p99 callback latency during the fault within a bound.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import requests

from tests.cluster.harness import ClusterAgent, is_terminal, wait_for
from tests.support.faultproxy import FaultProxy
from tests.support.live_relay import LiveRelay, live_relay

ADMIN_TOKEN = "faults-admin"
ADMIN = {"x-admin-token": ADMIN_TOKEN}
USER = "faulty"
MACHINE = "fault-box"
#: Small store timeouts, so a fault shows within a fraction of a second and the suite stays short.
FAST_STORE = {
    "REDIS_SOCKET_TIMEOUT_MS": "100",
    "REDIS_CONNECT_TIMEOUT_MS": "100",
    "REDIS_OP_DEADLINE_MS": "300",
    "REDIS_MAX_RETRIES": "1",
    "REDIS_BREAKER_FAIL_MAX": "3",
    "REDIS_BREAKER_RESET_TIMEOUT_MS": "500",
}
#: What "finishes within a bound" means for one callback during a fault: the store's worst case
#: (a few operations reaching their 300 ms deadline before the breaker opens) with a wide margin.
CALLBACK_BOUND_S = 3.0


def relay_env(redis_url: str, tmp_path: Path, phase: str, **extra: str) -> dict[str, str]:
    env = {
        "REDIS_URL": redis_url, "STORE_PHASE": phase, "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "ALLOWLIST_USERS": USER, "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"),
        "RATE_LIMIT_PER_MINUTE": "100000", "SWEEP_INTERVAL_MS": "1000",
        "MACHINE_HEARTBEAT_TIMEOUT_MS": "5000", **FAST_STORE,
    }
    env.update(extra)
    return env


@contextmanager
def faulty_relay(proxy: FaultProxy, tmp_path: Path, phase: str, app: str = "wsgi:app",
                 **extra: str) -> Iterator[LiveRelay]:
    with live_relay(app, env=relay_env(proxy.redis_url(), tmp_path, phase, **extra)) as relay:
        yield relay


@contextmanager
def agent_and_traffic(relay: LiveRelay, warm_up: int = 20) -> Iterator[tuple[ClusterAgent, "Traffic"]]:
    """The scene of a fault test: the agent "fault-box" connected to ``relay`` and steady callback
    traffic, ``warm_up`` of them answered before the test goes on (0: do not wait)."""
    with ClusterAgent("fault-box", [relay.agent_url], heartbeat_s=0.5) as agent, Traffic(relay) as traffic:
        assert agent.wait_connected()
        if warm_up:
            assert traffic.wait_for_more(warm_up)
        yield agent, traffic


def admin_get(relay: LiveRelay, path: str) -> requests.Response:
    return requests.get(relay.url(path), headers=ADMIN, timeout=10)


def store_status(relay: LiveRelay) -> dict[str, Any]:
    reply = admin_get(relay, "/ops/store")
    reply.raise_for_status()
    return reply.json()


def prometheus(relay: LiveRelay) -> str:
    reply = admin_get(relay, "/metrics/prometheus")
    reply.raise_for_status()
    return reply.text


def breaker_transitions(relay: LiveRelay) -> dict[tuple[str, str], float]:
    """``relay_store_breaker_transitions_total`` by (from, to)."""
    counts: dict[tuple[str, str], float] = {}
    for line in prometheus(relay).splitlines():
        if line.startswith("relay_store_breaker_transitions_total{"):
            labels, value = line.split("} ")
            parts = dict(item.split("=", 1) for item in labels.split("{", 1)[1].split(","))
            counts[(parts["from"].strip('"'), parts["to"].strip('"'))] = float(value)
    return counts


@dataclass
class Sample:
    phase: str
    msg_id: str
    started: float
    seconds: float
    status: int
    body: Optional[dict[str, Any]]


@dataclass
class Traffic:
    """Callbacks from a few threads: new msgIds, every fourth a repeat of an accepted one (WeCom
    delivering a message twice), and each msgId answered 503 sent again later (WeCom's retry)."""

    relay: LiveRelay
    threads: int = 3
    pause_s: float = 0.02
    samples: list[Sample] = field(default_factory=list)
    phase: str = "before"
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _retry: collections.deque[tuple[float, str]] = field(default_factory=collections.deque)
    _accepted: list[str] = field(default_factory=list)
    _workers: list[threading.Thread] = field(default_factory=list)
    #: Seconds before a refused msgId is sent again.
    retry_after_s: float = 0.5
    _forgotten: set[str] = field(default_factory=set)
    _forgotten_before: float = 0.0

    def __enter__(self) -> "Traffic":
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"traffic-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=15)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def forget_accepted(self) -> None:
        """Never deliver again a msgId accepted before now (no repeat, no retry of a repeat), even when
        its answer arrives later: only msgIds sent from now on are repeated."""
        with self._lock:
            self._forgotten.update(self._accepted)
            self._forgotten_before = time.monotonic()
            self._accepted.clear()
            self._retry = collections.deque(item for item in self._retry if item[1] not in self._forgotten)

    def _next_msg_id(self, n: int) -> str:
        with self._lock:
            if self._retry and self._retry[0][0] <= time.monotonic():
                return self._retry.popleft()[1]
            if n % 4 == 3 and self._accepted:
                return self._accepted[n % len(self._accepted)]
        return f"m{n}"

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            n = next(self._counter)
            msg_id = self._next_msg_id(n)
            self.send(session, msg_id)
            self._stop.wait(self.pause_s)

    def send(self, session: requests.Session, msg_id: str, text: Optional[str] = None) -> Sample:
        body = {"msgId": msg_id, "userId": USER, "machineId": MACHINE, "text": text or f"@dev task {msg_id}"}
        phase, started = self.phase, time.monotonic()
        try:
            reply = session.post(self.relay.url("/wecom/callback"), json=body, timeout=30)
            status, payload = reply.status_code, (reply.json() if reply.content else None)
        except requests.RequestException:
            status, payload = 0, None
        sample = Sample(phase, msg_id, started, time.monotonic() - started, status, payload)
        with self._lock:
            self.samples.append(sample)
            if status == 200 and payload and payload.get("commandId"):
                if started < self._forgotten_before:
                    self._forgotten.add(msg_id)
                else:
                    self._accepted.append(msg_id)
            elif status != 200 and not self._stop.is_set() and msg_id not in self._forgotten:
                self._retry.append((time.monotonic() + self.retry_after_s, msg_id))
        return sample

    def drain_retries(self, timeout_s: float = 20.0) -> bool:
        """Wait until every refused msgId has been sent again and answered 200 (WeCom retrying)."""
        def drained() -> bool:
            with self._lock:
                return not self._retry
        return bool(wait_for(drained, timeout_s=timeout_s))

    # -- reading ----------------------------------------------------------------------------------
    def in_phase(self, *phases: str) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.phase in phases]

    def accepted(self) -> dict[str, str]:
        """commandId → msgId of every callback answered with a command."""
        with self._lock:
            return {s.body["commandId"]: s.msg_id for s in self.samples
                    if s.status == 200 and s.body and s.body.get("commandId")}

    def statuses(self, *phases: str) -> collections.Counter[Any]:
        return collections.Counter(s.status for s in self.in_phase(*phases))

    def wait_for_more(self, count: int, timeout_s: float = 10.0, status: int = 200) -> bool:
        """Wait until ``count`` more callbacks of the current phase answered ``status``."""
        phase = self.phase
        before = sum(1 for s in self.in_phase(phase) if s.status == status)
        return bool(wait_for(lambda: sum(1 for s in self.in_phase(phase) if s.status == status) >= before + count,
                             timeout_s=timeout_s))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def p99(samples: list[Sample]) -> float:
    return percentile([s.seconds for s in samples], 99)


# -- invariants ------------------------------------------------------------------------------------
def assert_alive(relay: LiveRelay, workers: list[int]) -> None:
    """No crash (same workers as at the start) and no wedge (``/healthz`` at once)."""
    assert relay.running(), "the relay exited"
    assert relay.worker_pids() == workers, "a worker was replaced (crashed or killed)"
    reply = requests.get(relay.url("/healthz"), timeout=2)
    assert reply.status_code == 200


def assert_no_double_dispatch(traffic: Traffic, agent: ClusterAgent, exempt: frozenset[str] = frozenset()) -> None:
    """One command per msgId, and the agent received each command (and each msgId) once."""
    per_msg: dict[str, set[str]] = collections.defaultdict(set)
    for command_id, msg_id in traffic.accepted().items():
        per_msg[msg_id].add(command_id)
    twice = {m: ids for m, ids in per_msg.items() if len(ids) > 1 and m not in exempt}
    assert twice == {}, f"msgIds dispatched more than once: {twice}"
    commands = agent.commands()
    received = [c["commandId"] for c in commands]
    assert len(received) == len(set(received)), "the agent received a command twice"
    prompts = [c.get("prompt", "") for c in commands if not any(m in c.get("prompt", "") for m in exempt)]
    assert len(prompts) == len(set(prompts)), "the agent received two commands for one msgId"


def command_record(relay: LiveRelay, command_id: str) -> Optional[dict[str, Any]]:
    reply = admin_get(relay, f"/commands/{command_id}")
    return reply.json() if reply.status_code == 200 else None


def inflight_ids(relay: LiveRelay) -> set[str]:
    reply = admin_get(relay, "/inflight")
    reply.raise_for_status()
    return {item["commandId"] for item in reply.json()["items"]}


def assert_nothing_lost(relay: LiveRelay, command_ids: Mapping[str, str], timeout_s: float = 15.0) -> None:
    """Every accepted command has its audit (``created`` first) and ends terminal or in flight."""

    def settled(command_id: str, in_flight: set[str]) -> bool:
        record = command_record(relay, command_id)
        if record is None or not record["events"] or record["events"][0]["status"] != "created":
            return False
        return is_terminal(record["status"]) or command_id in in_flight

    def unsettled() -> list[str]:
        in_flight = inflight_ids(relay)
        return [c for c in command_ids if not settled(c, in_flight)]

    left = wait_for(lambda: unsettled() == [], timeout_s=timeout_s, interval_s=0.2)
    assert left, f"accepted commands lost: {unsettled()[:10]}"


def assert_retries_processed(traffic: Traffic) -> None:
    """Every msgId refused during the fault was processed (given a command) when sent again, not
    swallowed as a duplicate."""
    refused = {s.msg_id for s in traffic.samples if s.status != 200}
    accepted = set(traffic.accepted().values())
    assert refused <= accepted, f"msgIds never processed after a refusal: {sorted(refused - accepted)[:10]}"


def check_invariants(relay: LiveRelay, workers: list[int], traffic: Traffic, agent: ClusterAgent,
                     fault_phases: tuple[str, ...] = ("fault",), bound_s: float = CALLBACK_BOUND_S,
                     exempt: frozenset[str] = frozenset()) -> float:
    """Check the four invariants; return the p99 callback latency of ``fault_phases``."""
    assert_alive(relay, workers)
    assert_no_double_dispatch(traffic, agent, exempt)
    assert_nothing_lost(relay, traffic.accepted())
    during = traffic.in_phase(*fault_phases)
    assert during, "no traffic during the fault"
    slowest = max(s.seconds for s in during)
    assert slowest < bound_s, f"a callback took {slowest:.2f} s during the fault"
    return p99(during)
