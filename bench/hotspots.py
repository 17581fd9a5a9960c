"""``python -m bench.hotspots``: where Redis mode spends what memory mode does not, function by function.

One process, no gunicorn and no gevent: the relay app (``create_app``) under Flask's test client, 20
agents that only record frames, and the same workload in memory and in Redis mode (``redis-primary``,
on a redis-server of its own): ``@dev status`` callbacks, each answered by its agent's result at
once. Each mode runs under ``cProfile`` after a warm-up, and the table lists the functions whose own
time grew most from memory to Redis mode, with their calls per callback in each.

Not a measurement of the live relay: round trips here wait on blocking sockets (their wait shows as
``recv_into``), a profiled call costs several times its real price, and nothing is shared between
callbacks as under load. What it is for: finding which layers a Redis-mode callback passes through,
how often, and what a change took out (``--json`` for the whole table). ``make bench`` does not run it.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from config.settings import load_settings
from relay.app import create_app
from tests.support.redisproc import RedisServer

MODES = {"memory": "memory", "redis": "redis-primary"}
MACHINES = 20
USERS = 400
WARMUP = 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


@dataclass
class RecordingAgent:
    """An agent socket as the lifecycle sees it (``AgentConnection``): frames are kept, then dropped."""

    machine_id: Optional[str] = None
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    frames: list[dict[str, Any]] = field(default_factory=list)

    def send_json(self, frame: dict[str, Any]) -> bool:
        self.frames.append(frame)
        return True

    def close(self, reason: str = "") -> None:
        """Nothing to close."""


@dataclass
class Profiled:
    """One mode's run: CPU per callback and ``pstats`` rows keyed by ``file:line:function``."""

    callbacks: int
    cpu_us_per_callback: float
    #: key -> (calls, own seconds)
    functions: dict[str, tuple[int, float]]

    @property
    def calls_per_callback(self) -> float:
        return sum(calls for calls, _ in self.functions.values()) / self.callbacks


class _Workload:
    """A relay in one store phase with its agents attached."""

    def __init__(self, phase: str, redis_url: Optional[str], workdir: str) -> None:
        env = {"ALLOWLIST_USERS": ",".join(f"user-{i:04d}" for i in range(USERS)),
               "RATE_LIMIT_PER_MINUTE": "1000000", "STORE_PHASE": phase, "LOG_LEVEL": "ERROR",
               "RELAY_ADMIN_TOKEN": "bench", "AGENT_AUTH_TOKEN": "bench",
               "AUDIT_LOG_PATH": os.path.join(workdir, f"audit-{phase}.jsonl")}
        if redis_url:
            env["REDIS_URL"] = redis_url
        self.app = create_app(load_settings(env), start_background=False)
        self.relay = self.app.extensions["relay"]
        self.client = self.app.test_client()
        self.agents = [RecordingAgent() for _ in range(MACHINES)]
        for number, agent in enumerate(self.agents):
            with self.relay.router.bound():
                self.relay.agent_events.on_hello(agent, {"type": "agent.hello", "machineId": f"bench-m{number}"})

    def one(self, index: int) -> None:
        """A callback, then its agent's result, as the live relay handles them."""
        machine = index % MACHINES
        reply = self.client.post("/wecom/callback", json={
            "msgId": uuid.uuid4().hex, "userId": f"user-{index % USERS:04d}", "machineId": f"bench-m{machine}",
            "text": "@dev status"})
        ack = reply.get_json()
        if ack.get("status") != "sent_to_agent":
            raise RuntimeError(f"callback not dispatched: {ack}")
        agent = self.agents[machine]
        frame = {"type": "agent.result", "result": {"commandId": ack["commandId"], "machineId": f"bench-m{machine}",
                                                    "status": "ok", "summary": "all good"}}
        with self.relay.router.bound(fresh=True):
            self.relay.agent_events.on_result(agent, frame)
        agent.frames.clear()

    def close(self) -> None:
        self.relay.close()


@contextmanager
def _workload(mode: str, workdir: str) -> Iterator[_Workload]:
    server = RedisServer().start() if mode != "memory" else None
    try:
        workload = _Workload(MODES[mode], server.url if server else None, workdir)
        try:
            yield workload
        finally:
            workload.close()
    finally:
        if server is not None:
            server.close()


def _key(filename: str, line: int, name: str) -> str:
    return f"{filename.removeprefix(ROOT)}:{line}:{name}"


def profile_mode(mode: str, callbacks: int, workdir: str) -> Profiled:
    """``callbacks`` callbacks and results of ``mode`` under cProfile, after a warm-up."""
    with _workload(mode, workdir) as workload:
        for index in range(WARMUP):
            workload.one(index)
        profiler = cProfile.Profile()
        started = time.process_time()
        profiler.enable()
        for index in range(callbacks):
            workload.one(index)
        profiler.disable()
        cpu_s = time.process_time() - started
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    functions = {_key(*where): (calls, own) for where, (_, calls, own, _, _) in stats.items()}
    return Profiled(callbacks, 1e6 * cpu_s / callbacks, functions)


def compare(memory: Profiled, redis: Profiled, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions by growth of own time per callback from memory to Redis mode."""
    rows = []
    for key in memory.functions.keys() | redis.functions.keys():
        calls_m, own_m = memory.functions.get(key, (0, 0.0))
        calls_r, own_r = redis.functions.get(key, (0, 0.0))
        rows.append({"function": key,
                     "own_us_delta": round(1e6 * (own_r / redis.callbacks - own_m / memory.callbacks), 1),
                     "calls_memory": round(calls_m / memory.callbacks, 2),
                     "calls_redis": round(calls_r / redis.callbacks, 2)})
    rows.sort(key=lambda row: row["own_us_delta"], reverse=True)
    return rows[:top]


def run(callbacks: int = 2000, top: int = 30) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="relay-profile-") as workdir:
        profiled = {mode: profile_mode(mode, callbacks, workdir) for mode in MODES}
    rows = compare(profiled["memory"], profiled["redis"], top)
    print(f"{callbacks} callbacks and their results per mode, in one process under cProfile "
          "(profiled CPU, several times the live relay's)")
    for mode, result in profiled.items():
        print(f"{mode:7} {result.cpu_us_per_callback:8.0f} µs CPU and {result.calls_per_callback:6.0f} "
              f"Python calls per callback")
    print(f"{'own µs +':>9} {'calls mem':>9} {'calls redis':>11}  function (Redis mode minus memory mode)")
    for row in rows:
        print(f"{row['own_us_delta']:9.1f} {row['calls_memory']:9.2f} {row['calls_redis']:11.2f}  {row['function']}")
    return {"callbacks": callbacks,
            "modes": {mode: {"cpu_us_per_callback": round(result.cpu_us_per_callback, 1),
                             "calls_per_callback": round(result.calls_per_callback, 1)}
                      for mode, result in profiled.items()},
            "top": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotspots", description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=2000, help="callbacks per mode (default 2000)")
    parser.add_argument("--top", type=int, default=30, help="functions listed (default 30)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = parser.parse_args(argv)
    if args.callbacks < 1 or args.top < 1:
        parser.error("--callbacks and --top must be positive")
    report = run(args.callbacks, args.top)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
