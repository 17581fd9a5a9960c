"""Audit index benchmark: append and ``list_recent(50)`` latency with 1k and 100k records in Redis,
unfiltered and filtered by a user with a single record, and the replay of the JSONL log at startup.

The index runs as in the relay (``AuditIndex`` on a routed ``redis-primary`` store, one unit of work
per call) on a redis-server started here. It is filled with records shaped like the relay's (a
``created`` and a ``sent_to_agent`` event, envelopes from the domain's own schema), written with
pipelines. Target (from the issue): at 100k records, append and ``list_recent`` within 1.3x of 1k.

Filtered (``/audit/recent?userId=``), ``list_recent`` reads the records of the user's value index
up to the watermark ``AuditIndex.link`` left, and every record written since. Each index is
linked once after it is filled (timed: ``link_s``), as the sweeps' leader would, so the appends
of the timed rounds come after the watermark, as the last period's writes do in a live relay.
``FILTERED_USER`` has one record at either size, the oldest: the one a read of every record
finds last.

The replay (``AuditTrail.hydrate`` with a unit of work per chunk, as the relay runs it at startup)
reads a log of ``REPLAY_COMMANDS`` commands, two events each, into an empty index (Redis lost its
data), then again into the index it made (a restart with Redis intact, the common case).
"""
from __future__ import annotations

import gc
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.phases import PRESETS
from middleware.breaker import GuardedBreaker
from middleware.routing import StoreRouter
from relay.domains import audit
from relay.lifecycle.context import AuditTrail
from relay.stores.envelope import iso_ms
from relay.stores.keys import KeySpace
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.support.redisproc import RedisServer

SIZES = (1_000, 100_000)
SAMPLES = 100
ROUNDS = 5
FILL_BATCH = 2_000
RATIO_TARGET = 1.3
START_MS = 1_790_000_000_000
REPLAY_COMMANDS = 5_000
FILTERED_USER = "user-oldest"
FILTERED_SAMPLES = 20


#: The timed calls, as named in the report.
CELLS = ("append_us", "list_recent_50_us", "list_recent_50_of_user_us")


def _events(command_id: str, at_ms: int, user: str, machine: str) -> list[dict[str, Any]]:
    base = {"commandId": command_id, "userId": user, "machineId": machine}
    return [{**base, "timestamp": iso_ms(at_ms), "status": "created", "kind": "status", "summary": "@dev status"},
            {**base, "timestamp": iso_ms(at_ms + 1), "status": "sent_to_agent", "kind": "status"}]


def _fill(server: RedisServer, router: StoreRouter, index: audit.AuditIndex, start: int, count: int) -> None:
    """Add records ``start .. start+count-1`` (one per millisecond), written in pipelines."""
    store = router.store("audit")
    client = server.client()
    try:
        for first in range(start, start + count, FILL_BATCH):
            pipe = client.pipeline(transaction=False)
            scores = {}
            for n in range(first, min(first + FILL_BATCH, start + count)):
                command_id = f"fill-{n:07d}"
                record = None
                user = FILTERED_USER if n == 0 else f"user-{n % 4000:04d}"
                for event in _events(command_id, START_MS + n, user, f"bench-m{n % 20}"):
                    record = audit.apply_event(record, event, index.max_events)
                pipe.set(store.key(command_id), store.encode(record))
                scores[command_id] = float(START_MS + n + 1)
            pipe.zadd(store.index_key(audit.INDEX), scores)
            pipe.execute()
    finally:
        client.close()


def _time_us(call: Callable[[int], Any], count: int, first: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter_ns()
        call(first + i)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {f"p{q}": round(ordered[round(last * q / 100)], 1) for q in (50, 95, 99)}


class _Subject:
    """One audit index of ``size`` records, in its own key space on the shared server."""

    def __init__(self, server: RedisServer, backends: dict[str, Any], size: int) -> None:
        self.size = size
        self.router = StoreRouter(KeySpace("bench", f"audit{size}"), {"audit": audit.DOMAIN}, backends,
                                  {"audit": PRESETS["redis-primary"]})
        self.index = audit.AuditIndex(self.router.provider("audit"), max_records=2 * size + ROUNDS * SAMPLES)
        started = time.monotonic()
        _fill(server, self.router, self.index, 0, size)
        self.fill_s = time.monotonic() - started
        started = time.monotonic()
        with self.router.bound():
            self.index.link(START_MS + size + 1)
        self.link_s = time.monotonic() - started
        self.appends: list[float] = []
        self.listing: list[float] = []
        self.filtered: list[float] = []

    def append(self, n: int) -> None:
        event = _events(f"new-{n:06d}-{uuid.uuid4().hex[:8]}", START_MS + self.size + 10_000 + n, "user-0001",
                        "bench-m1")[0]
        with self.router.bound():
            self.index.apply(event)

    def recent(self, _: int) -> None:
        with self.router.bound():
            self.index.list_recent(50)

    def recent_of_user(self, _: int) -> None:
        with self.router.bound():
            self.index.list_recent(50, user_id=FILTERED_USER)

    def result(self) -> dict[str, Any]:
        with self.router.bound():
            count = self.index.count()
        return {"records": count, "fill_s": round(self.fill_s, 1), "link_s": round(self.link_s, 2),
                "append_us": _percentiles(self.appends),
                "list_recent_50_us": _percentiles(self.listing),
                "list_recent_50_of_user_us": _percentiles(self.filtered)}


def _replay(backends: dict[str, Any]) -> dict[str, Any]:
    """Seconds to replay a log of ``REPLAY_COMMANDS`` commands into an empty index, then into it again."""
    router = StoreRouter(KeySpace("bench", "replay"), {"audit": audit.DOMAIN}, backends,
                         {"audit": PRESETS["redis-primary"]})
    index = audit.AuditIndex(router.provider("audit"), max_records=2 * REPLAY_COMMANDS)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as workdir:
            log = Path(workdir) / "audit.jsonl"
            log.write_text("".join(json.dumps(event) + "\n" for n in range(REPLAY_COMMANDS)
                                   for event in _events(f"log-{n:06d}", START_MS + 2 * n, "user-0001", "bench-m1")))
            trail = AuditTrail(index, str(log))
            timed = {}
            for name in ("into_empty", "into_intact"):
                started = time.perf_counter()
                added = trail.hydrate(router.bound)
                timed[name] = {"seconds": round(time.perf_counter() - started, 2), "events_added": added}
    finally:
        router.close()
    return {"commands": REPLAY_COMMANDS, "events": 2 * REPLAY_COMMANDS, **timed}


def run() -> dict[str, Any]:
    with RedisServer() as server:
        redis_store = RedisStore(server.url, breaker=GuardedBreaker(fail_max=5, reset_timeout=30))
        backends = {"memory": MemoryStore(), "redis": redis_store}
        subjects = [_Subject(server, backends, size) for size in SIZES]
        try:
            for subject in subjects:
                subject.append(-1)
                subject.recent(-1)
            gc.disable()
            try:
                # Interleaved rounds: a drift in machine load affects both sizes alike.
                for round_ in range(ROUNDS):
                    for subject in subjects:
                        subject.appends += _time_us(subject.append, SAMPLES, round_ * SAMPLES)
                        subject.listing += _time_us(subject.recent, SAMPLES, 0)
                        subject.filtered += _time_us(subject.recent_of_user, FILTERED_SAMPLES, 0)
            finally:
                gc.enable()
            results = {str(subject.size): subject.result() for subject in subjects}
        finally:
            for subject in subjects:
                subject.router.close()
        replay = _replay(backends)
    small, large = results[str(SIZES[0])], results[str(SIZES[-1])]
    ratios = {name: round(large[name]["p50"] / small[name]["p50"], 2) for name in CELLS}
    _print(results, ratios, replay)
    return {"sizes": results, "ratio_p50_large_to_small": ratios, "replay": replay,
            "targets": {"ratio_max": RATIO_TARGET, "met": all(r <= RATIO_TARGET for r in ratios.values())}}


def _print(results: dict[str, Any], ratios: dict[str, float], replay: dict[str, Any]) -> None:
    print(f"AuditIndex on Redis (redis-primary), {ROUNDS * SAMPLES} calls per cell ({ROUNDS * FILTERED_SAMPLES} "
          f"filtered by {FILTERED_USER}) in {ROUNDS} interleaved rounds")
    print(f"{'records':>9}{'op':>28}{'p50 µs':>12}{'p95 µs':>12}{'p99 µs':>12}")
    for size, row in results.items():
        for name in CELLS:
            pct = row[name]
            print(f"{row['records']:>9}{name[:-3]:>28}{pct['p50']:>12.1f}{pct['p95']:>12.1f}{pct['p99']:>12.1f}")
    print("linked once filled (AuditIndex.link, as the sweeps' leader would): "
          + ", ".join(f"{row['records'] - ROUNDS * SAMPLES - 1} records in {row['link_s']:.2f} s" for row in results.values()))
    for name, ratio in ratios.items():
        verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
        print(f"{name[:-3]}: p50 at {SIZES[-1]} / at {SIZES[0]} records = {ratio:.2f}x   target <= {RATIO_TARGET}x: "
              f"{verdict}")
    print(f"log replay at startup, {replay['commands']} commands ({replay['events']} events): into an empty index "
          f"{replay['into_empty']['seconds']:.2f} s ({replay['into_empty']['events_added']} events added), "
          f"into the intact index {replay['into_intact']['seconds']:.2f} s "
          f"({replay['into_intact']['events_added']} added)")


if __name__ == "__main__":
    run()
