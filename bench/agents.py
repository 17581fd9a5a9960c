"""Agent-channel benchmark: many agent WebSockets on one live relay while HTTP requests run.

``python -m bench.agents [--agents 500] [--requests 2000] [--app SPEC] [--path /healthz]``

Starts gunicorn with ``config/gunicorn.py`` (one worker), measures HTTP latency with no agents,
connects the agents (hello on open, heartbeats, pongs: ``tests.support.agent_swarm``), then
measures HTTP latency again with all of them connected, and reports the worker's RSS, threads,
descriptors and CPU time. The whole run is bounded by ``--budget`` seconds (default 55).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import requests

from tests.support.agent_swarm import AgentSwarm
from tests.support.live_relay import TEST_APP, LiveRelay, ProcessStats, live_relay, process_times


def _percentiles(samples_ms: list[float]) -> dict[str, Optional[float]]:
    if not samples_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples_ms)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)

    return {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": round(ordered[-1], 2)}


def _http_load(url: str, total: int, threads: int, deadline: float) -> dict[str, Any]:
    """``total`` GETs spread over ``threads`` keep-alive clients, stopping at ``deadline``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with requests.Session() as http:
            for _ in counter:
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                try:
                    status = http.get(url, timeout=10).status_code
                except requests.RequestException as exc:
                    status, detail = 0, type(exc).__name__
                else:
                    detail = str(status)
                elapsed_ms = (time.perf_counter() - started) * 1000
                with lock:
                    if status == 200:
                        latencies.append(elapsed_ms)
                    else:
                        errors.append(detail)

    started = time.monotonic()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - started
    return {
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "rps": round((len(latencies) + len(errors)) / seconds, 1) if seconds else None,
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
        **_percentiles(latencies),
    }


def _worker(relay: LiveRelay) -> ProcessStats:
    (stats,) = relay.worker_stats()
    return stats


def _describe(stats: ProcessStats) -> dict[str, Any]:
    return {"rss_mib": round(stats.rss_kib / 1024, 1), "threads": stats.threads, "fds": stats.open_fds}


def _raise_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))


def run(
    agents: int = 500,
    requests_total: int = 2000,
    app: str = TEST_APP,
    path: str = "/healthz",
    http_threads: int = 4,
    heartbeat_s: float = 10.0,
    budget_s: float = 55.0,
    env: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + budget_s
    _raise_open_file_limit(agents + 512)
    result: dict[str, Any] = {"agents": agents, "app": app, "path": path, "http_threads": http_threads}
    with live_relay(app, env=env or {}) as relay:
        url = relay.url(path)
        result["idle_worker"] = _describe(_worker(relay))
        result["http_without_agents"] = _http_load(url, max(100, requests_total // 4), http_threads,
                                                   min(deadline, time.monotonic() + budget_s * 0.15))

        connect_started = time.monotonic()
        with AgentSwarm(relay.agent_url, agents, prefix="bench", heartbeat_s=heartbeat_s) as swarm:
            swarm.wait_until(lambda s: s.count("open") == agents, max(1.0, deadline - time.monotonic() - 20))
            result["connected"] = swarm.count("open")
            result["connect_seconds"] = round(time.monotonic() - connect_started, 2)
            swarm.wait_until(lambda s: s.agents_that_received(_is_agent_connected) == agents,
                             max(1.0, deadline - time.monotonic() - 15))
            result["registered"] = swarm.agents_that_received(_is_agent_connected)
            result["register_seconds"] = round(time.monotonic() - connect_started, 2)
            result["worker_with_agents"] = _describe(_worker(relay))

            cpu_before = process_times(_worker(relay).pid).cpu_s
            load = _http_load(url, requests_total, http_threads, deadline - 5)
            load["relay_cpu_seconds"] = round(process_times(_worker(relay).pid).cpu_s - cpu_before, 2)
            result["http_with_agents"] = load
            result["worker_after_load"] = _describe(_worker(relay))
            result["still_connected"] = swarm.count("open")
            result["connect_errors"] = swarm.connect_errors
    result["budget_s"] = budget_s
    _print(result)
    return result


def _is_agent_connected(frame: dict[str, Any]) -> bool:
    return frame.get("type") == "relay.trace" and frame.get("trace", {}).get("stage") == "agent_connected"


def _print(result: dict[str, Any]) -> None:
    print(f"agents: {result['connected']}/{result['agents']} connected in {result['connect_seconds']} s, "
          f"{result['registered']} registered (agent_connected trace) in {result['register_seconds']} s, "
          f"{result['still_connected']} still open after the load")
    for label in ("idle_worker", "worker_with_agents", "worker_after_load"):
        w = result[label]
        print(f"{label:>20}: RSS {w['rss_mib']} MiB, {w['threads']} threads, {w['fds']} fds")
    for label in ("http_without_agents", "http_with_agents"):
        h = result[label]
        cpu = f", relay CPU {h['relay_cpu_seconds']} s" if "relay_cpu_seconds" in h else ""
        print(f"{label:>20}: {h['requests']} GET {result['path']} ({h['errors']} errors) {h['rps']} req/s; "
              f"p50 {h['p50_ms']} ms, p95 {h['p95_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms{cpu}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents", description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--requests", type=int, default=2000, dest="requests_total")
    parser.add_argument("--app", default=TEST_APP, help="gunicorn app spec (default: the channel test app)")
    parser.add_argument("--path", default="/healthz", help="HTTP path to load (GET)")
    parser.add_argument("--http-threads", type=int, default=4)
    parser.add_argument("--heartbeat", type=float, default=10.0, dest="heartbeat_s")
    parser.add_argument("--budget", type=float, default=55.0, dest="budget_s", help="seconds for the whole run")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args(argv)
    options = vars(args)
    as_json = options.pop("json")
    result = run(**options)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result["connected"] == result["agents"] and result["http_with_agents"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
