"""``bench/hotspots.py``: the per-callback comparison of memory and Redis mode under cProfile."""
from __future__ import annotations

from pathlib import Path

from bench import hotspots
from bench.hotspots import Profiled


def test_rows_are_per_callback_and_ordered_by_the_growth_of_own_time() -> None:
    memory = Profiled(10, 100.0, {"a.py:1:same": (10, 0.001), "a.py:2:grows": (20, 0.001)})
    redis = Profiled(20, 150.0, {"a.py:1:same": (20, 0.002), "a.py:2:grows": (40, 0.010),
                                 "b.py:3:redis_only": (60, 0.004)})
    rows = hotspots.compare(memory, redis, top=2)
    assert [row["function"] for row in rows] == ["a.py:2:grows", "b.py:3:redis_only"]
    assert rows[0] == {"function": "a.py:2:grows", "own_us_delta": 400.0, "calls_memory": 2.0, "calls_redis": 2.0}
    assert rows[1]["calls_memory"] == 0 and rows[1]["calls_redis"] == 3.0
    assert redis.calls_per_callback == 6.0


def test_the_redis_store_shows_up_in_redis_mode_once_per_round_trip(tmp_path: Path) -> None:
    """A callback and its result: three round trips (two for the callback, one for the result on the
    process that dispatched it), every one through ``RedisStore.execute``."""
    memory = hotspots.profile_mode("memory", 20, str(tmp_path))
    redis = hotspots.profile_mode("redis", 20, str(tmp_path))
    rows = hotspots.compare(memory, redis, top=100_000)
    execute = [row for row in rows if row["function"].startswith("relay/stores/redis.py:")
               and row["function"].endswith(":execute")]
    assert len(execute) == 1
    assert execute[0]["calls_memory"] == 0 and execute[0]["calls_redis"] == 3
    assert redis.calls_per_callback > memory.calls_per_callback
