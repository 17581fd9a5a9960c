"""RedisStore behaviour beyond the contract: timeouts, retries, the circuit breaker,
the per-process pool, and the non-serializing breaker and retry policy it uses."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fakeredis
import pybreaker
import pytest
import redis

from middleware.breaker import GuardedBreaker, StateChangeListener
from middleware.retry import RetryPolicy
from relay.stores.base import Op, StoreError, StoreUnavailable, ValueTooLarge
from relay.stores.redis import RedisStore, StoreCounters
from tests.support.helpers import race
from tests.support.redisproc import RedisServer

SOCKET_MS = 100
DEADLINE_MS = 500
MARGIN_S = 0.4  # scheduling slack for "finishes within the deadline" checks


def no_sleep_retry(**kwargs: Any) -> RetryPolicy:
    return RetryPolicy(sleep=lambda _: None, **kwargs)


@pytest.fixture
def make_store(redis_server: RedisServer) -> Iterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(**kwargs: Any) -> RedisStore:
        options: dict[str, Any] = {
            "breaker": GuardedBreaker(fail_max=1000),
            "socket_timeout_ms": SOCKET_MS,
            "connect_timeout_ms": SOCKET_MS,
            "op_deadline_ms": DEADLINE_MS,
            "retry": no_sleep_retry(),
        }
        options.update(kwargs)
        store = RedisStore(redis_server.url, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# -- client configuration -------------------------------------------------------------------------
def test_hiredis_parser_is_in_use(make_store: Callable[..., RedisStore]) -> None:
    assert make_store().parser_name() == "ReadinessParser"  # hiredis's, with a cheaper readiness check


def test_client_has_our_timeouts_and_no_redis_py_retries(make_store: Callable[..., RedisStore]) -> None:
    store = make_store(socket_timeout_ms=120, connect_timeout_ms=80)
    kwargs = store._client().connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == pytest.approx(0.12)
    assert kwargs["socket_connect_timeout"] == pytest.approx(0.08)
    assert kwargs["retry"].get_retries() == 0


@pytest.mark.parametrize(
    "options",
    [
        {"socket_timeout_ms": 0},
        {"connect_timeout_ms": -1},
        {"op_deadline_ms": 2.5},
        {"socket_timeout_ms": 300, "connect_timeout_ms": 300, "op_deadline_ms": 500},
    ],
)
def test_constructor_rejects_bad_timeouts(options: dict) -> None:
    with pytest.raises(ValueError):
        RedisStore("redis://127.0.0.1:1/0", breaker=None, **options)


def test_client_factory_must_decode_responses() -> None:
    store = RedisStore.from_client(fakeredis.FakeRedis(), breaker=None)
    with pytest.raises(ValueError, match="decode_responses"):
        store.get("k")


def test_invalid_calls_never_reach_the_network() -> None:
    def unreachable() -> redis.Redis:
        raise AssertionError("the client was created")

    store = RedisStore(unreachable, breaker=None, max_value_bytes=10)
    invalid: list[Callable[[], Any]] = [
        lambda: store.set("k", "v", ttl_ms=0),
        lambda: store.set("k", "x" * 11),
        lambda: store.set("k", b"bytes"),
        lambda: store.mset({"a": "v", "b": 1}),
        lambda: store.set_if_absent("k", "v", ttl_ms=-5),
        lambda: store.compare_and_set("k", None, "v", ttl_ms=1.5),
        lambda: store.incr("k", 1.5),
        lambda: store.acquire_lock("k", "t", None),
        lambda: store.extend_lock("k", "t", 0),
        lambda: store.index_range("k", limit=-1),
        lambda: store.index_trim("k", -1),
    ]
    for call in invalid:
        with pytest.raises((ValueError, TypeError)):
            call()
    with pytest.raises(ValueTooLarge):
        store.mset({"a": "v", "b": "x" * 11})


# -- error mapping -----------------------------------------------------------------------------------
def test_server_errors_are_store_errors_and_do_not_trip_the_breaker(
    make_store: Callable[..., RedisStore],
) -> None:
    breaker = GuardedBreaker(fail_max=1)
    store = make_store(breaker=breaker)
    store.index_add("idx", {"m": 1})
    for _ in range(3):
        with pytest.raises(StoreError) as caught:
            store.get("idx")
        assert not isinstance(caught.value, StoreUnavailable)
        assert "WRONGTYPE" in str(caught.value)
    assert store.breaker_state == "closed"
    assert breaker.fail_counter == 0
    assert store.counters.snapshot() == {"retries": 0, "timeouts": 0, "connection_errors": 0, "errors": 3}


def test_lua_scripts_survive_a_script_cache_flush(make_store: Callable[..., RedisStore], redis_server: RedisServer) -> None:
    store = make_store()
    assert store.compare_and_set("k", None, "1")
    with redis_server.client() as client:
        client.script_flush()
    assert store.compare_and_set("k", "1", "2")
    assert store.get("k") == "2"


def test_one_key_written_with_a_ttl_takes_no_script(make_store: Callable[..., RedisStore],
                                                    redis_server: RedisServer) -> None:
    """The common ``mset`` (a user's locale) is one ``SET PX``: a script costs redis-server several
    times as much. Two keys still go together in one script."""
    store = make_store()
    with redis_server.client() as client:
        def scripts_run() -> int:
            stats = client.info("commandstats")
            return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_eval", "cmdstat_evalsha"))

        client.config_resetstat()
        store.mset({"a": "1"}, ttl_ms=60_000)
        store.execute([Op("mset", ({"b": "2"}, 60_000))])
        assert scripts_run() == 0
        store.execute([Op("mset", ({"c": "3", "d": "4"}, 60_000))])
        assert scripts_run() == 1


# -- retries ------------------------------------------------------------------------------------------
IDEMPOTENT: dict[str, Callable[[RedisStore], Any]] = {
    "get": lambda s: s.get("k"),
    "set": lambda s: s.set("k", "v"),
    "mget": lambda s: s.mget(["k"]),
    "mset": lambda s: s.mset({"k": "v"}, ttl_ms=1000),
    "delete": lambda s: s.delete("k"),
    "ttl_ms": lambda s: s.ttl_ms("k"),
    "extend_lock": lambda s: s.extend_lock("k", "t", 1000),
    "index_add": lambda s: s.index_add("i", {"m": 1}),
    "index_range": lambda s: s.index_range("i"),
    "index_remove": lambda s: s.index_remove("i", ["m"]),
    "index_count": lambda s: s.index_count("i"),
}
NON_IDEMPOTENT: dict[str, Callable[[RedisStore], Any]] = {
    "set_if_absent": lambda s: s.set_if_absent("k", "v"),
    "compare_and_set": lambda s: s.compare_and_set("k", None, "v"),
    "compare_and_delete": lambda s: s.compare_and_delete("k", "v"),
    "incr": lambda s: s.incr("k"),
    "incr_ttl": lambda s: s.incr("k", 1, ttl_ms=1000),
    "acquire_lock": lambda s: s.acquire_lock("k", "t", 1000),
    "release_lock": lambda s: s.release_lock("k", "t"),
    "index_trim": lambda s: s.index_trim("i", 1),
}


@pytest.mark.parametrize("op", IDEMPOTENT)
def test_idempotent_operations_retry_connection_errors(
    make_store: Callable[..., RedisStore], redis_server: RedisServer, op: str
) -> None:
    store = make_store()
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        IDEMPOTENT[op](store)
    assert store.counters.snapshot() == {"retries": 2, "timeouts": 0, "connection_errors": 3, "errors": 1}


@pytest.mark.parametrize("op", NON_IDEMPOTENT)
def test_non_idempotent_operations_are_never_retried(
    make_store: Callable[..., RedisStore], redis_server: RedisServer, op: str
) -> None:
    store = make_store()
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        NON_IDEMPOTENT[op](store)
    assert store.counters.snapshot() == {"retries": 0, "timeouts": 0, "connection_errors": 1, "errors": 1}


def test_ping_reports_reachability(make_store: Callable[..., RedisStore], redis_server: RedisServer) -> None:
    store = make_store()
    assert store.ping() is True
    redis_server.stop()
    assert store.ping() is False


def test_timeouts_are_retried_within_the_deadline(
    make_store: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    store = make_store(retry=RetryPolicy())
    store.set("k", "v")
    redis_server.pause()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.get("k")
    elapsed = time.monotonic() - started
    counts = store.counters.snapshot()
    assert elapsed < DEADLINE_MS / 1000 + MARGIN_S
    assert counts["timeouts"] == counts["retries"] + 1
    assert 1 <= counts["retries"] <= 2


def test_deadline_leaves_no_room_for_a_retry_after_a_timeout(
    make_store: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    store = make_store(op_deadline_ms=2 * SOCKET_MS + 50)
    store.set("k", "v")
    redis_server.pause()
    with pytest.raises(StoreUnavailable):
        store.get("k")
    assert store.counters.snapshot()["timeouts"] == 1
    assert store.counters.snapshot()["retries"] == 0


def test_non_idempotent_write_times_out_once(make_store: Callable[..., RedisStore], redis_server: RedisServer) -> None:
    store = make_store()
    store.set("warm", "v")
    redis_server.pause()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.set_if_absent("k", "v")
    assert time.monotonic() - started < SOCKET_MS / 1000 + MARGIN_S
    assert store.counters.snapshot() == {"retries": 0, "timeouts": 1, "connection_errors": 0, "errors": 1}


def test_restarted_server_is_used_again_without_a_failed_write(
    make_store: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    store = make_store()
    race(4, lambda i: store.set(f"warm{i}", "v"))  # several pooled connections
    redis_server.stop()
    redis_server.start()
    assert [store.set_if_absent(f"k{i}", "v") for i in range(4)] == [True] * 4
    assert store.counters.snapshot()["errors"] == 0


# -- circuit breaker ----------------------------------------------------------------------------------
def test_breaker_opens_fails_fast_half_opens_and_closes(
    make_store: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    transitions: list[tuple[str | None, str]] = []
    breaker = GuardedBreaker(
        fail_max=3,
        reset_timeout=0.5,
        name="redis",
        listeners=[StateChangeListener(lambda name, old, new: transitions.append((old, new)))],
    )
    store = make_store(breaker=breaker, retry=RetryPolicy(max_retries=0))
    store.set("k", "v")
    redis_server.pause()
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            store.get("k")
    assert store.breaker_state == "open"
    assert store.counters.snapshot()["timeouts"] == 3

    with pytest.raises(StoreUnavailable, match="circuit breaker"):
        store.get("k")
    assert breaker.rejected == 1
    assert store.counters.snapshot()["timeouts"] == 3  # no attempt was made

    redis_server.resume()
    time.sleep(0.55)
    assert store.get("k") == "v"
    assert store.breaker_state == "closed"
    assert transitions == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_failed_trial_reopens_the_breaker(make_store: Callable[..., RedisStore], redis_server: RedisServer) -> None:
    breaker = GuardedBreaker(fail_max=1, reset_timeout=0.1)
    store = make_store(breaker=breaker, retry=RetryPolicy(max_retries=0))
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        store.get("k")
    assert store.breaker_state == "open"
    time.sleep(0.15)
    with pytest.raises(StoreUnavailable):
        store.get("k")
    assert store.counters.snapshot()["connection_errors"] == 2
    assert store.breaker_state == "open"


def test_call_blocked_on_a_paused_server_does_not_hold_up_other_calls(redis_server: RedisServer) -> None:
    """One breaker guards two stores; a call stuck on the paused server must not stall the other."""
    breaker = GuardedBreaker(fail_max=1000)
    slow = RedisStore(
        redis_server.url, breaker=breaker, socket_timeout_ms=2000, connect_timeout_ms=100,
        op_deadline_ms=2100, retry=RetryPolicy(max_retries=0),
    )
    fast = RedisStore.from_client(fakeredis.FakeRedis(decode_responses=True), breaker=breaker)
    try:
        slow.set("k", "v")
        fast.set("k", "fast")
        redis_server.pause()
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(slow.get, "k")
            time.sleep(0.1)
            assert fast.get("k") == "fast"
            assert not stuck.done()
            redis_server.resume()
            assert stuck.result(timeout=5) == "v"
    finally:
        slow.close()


def _all_inside_at_once(breaker: pybreaker.CircuitBreaker, wait_s: float, threads: int = 8) -> bool:
    """Whether ``threads`` guarded calls can all be running at the same moment."""
    inside = threading.Barrier(threads)

    def guarded() -> bool:
        try:
            inside.wait(timeout=wait_s)
            return True
        except threading.BrokenBarrierError:
            return False

    return all(race(threads, lambda _: breaker.call(guarded)))


def test_guarded_breaker_lets_eight_calls_run_together() -> None:
    assert _all_inside_at_once(GuardedBreaker(), wait_s=10) is True


def test_stock_pybreaker_serializes_calls() -> None:
    """The control for the test above (pybreaker issue 55): the same check fails on the stock breaker."""
    assert _all_inside_at_once(pybreaker.CircuitBreaker(fail_max=1000), wait_s=0.5) is False


def test_half_open_breaker_runs_one_trial_at_a_time() -> None:
    breaker = GuardedBreaker(fail_max=1, reset_timeout=0)
    breaker.open()
    trial_running, finish_trial = threading.Event(), threading.Event()

    def trial() -> str:
        trial_running.set()
        finish_trial.wait(timeout=5)
        return "trial"

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(breaker.call, trial)
        assert trial_running.wait(timeout=5)
        assert breaker.state_name == "half-open"
        with pytest.raises(pybreaker.CircuitBreakerError):
            breaker.call(lambda: "other")
        finish_trial.set()
        assert result.result(timeout=5) == "trial"
    assert breaker.state_name == "closed"
    assert breaker.call(lambda: "after") == "after"
    assert breaker.rejected == 1


def test_breaker_keeps_pybreaker_semantics() -> None:
    events: list[str] = []

    class Recorder(pybreaker.CircuitBreakerListener):
        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            events.append("before")

        def failure(self, cb: Any, exc: BaseException) -> None:
            events.append("failure")

        def success(self, cb: Any) -> None:
            events.append("success")

    breaker = GuardedBreaker(fail_max=2, reset_timeout=60, exclude=[KeyError], listeners=[Recorder()])

    def fail(exc: BaseException) -> None:
        raise exc

    with pytest.raises(KeyError):
        breaker.call(fail, KeyError("business error"))
    with pytest.raises(OSError):
        breaker.call(fail, OSError("down"))
    assert breaker.fail_counter == 1
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(fail, OSError("down again"))
    assert breaker.state_name == "open"
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(lambda: None)
    assert events == ["before", "success", "before", "failure", "before", "failure"]
    with pytest.raises(pybreaker.CircuitBreakerError):
        with breaker.calling():
            pass


# -- pool per process ----------------------------------------------------------------------------------
def test_pool_is_recreated_when_the_pid_changes(
    make_store: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    store.set("k", "v")
    parent_client = store._client()
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    assert store.get("k") == "v"
    child_client = store._client()
    assert child_client is not parent_client
    assert store._client() is child_client
    monkeypatch.undo()
    assert store._client() is not child_client


def test_forked_child_gets_its_own_pool(make_store: Callable[..., RedisStore]) -> None:
    store = make_store()
    store.set("k", "parent")
    parent_client = store._client()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            store.set("k", "child")
            code = 0 if store._client() is not parent_client else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._client() is parent_client
    assert store.get("k") == "child"


# -- retry policy ----------------------------------------------------------------------------------------
def test_backoff_is_full_jitter_under_a_capped_exponential_ceiling() -> None:
    top = RetryPolicy(base_ms=10, cap_ms=15, rand=lambda: 1.0)
    assert [top.backoff_s(n) for n in (1, 2, 3)] == [0.010, 0.015, 0.015]
    assert RetryPolicy(base_ms=10, rand=lambda: 0.0).backoff_s(2) == 0.0
    assert RetryPolicy(base_ms=10, rand=lambda: 0.5).backoff_s(2) == pytest.approx(0.010)


def test_retry_policy_retries_at_most_twice() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(rand=lambda: 1.0, base_ms=4, sleep=sleeps.append, clock=lambda: 0.0)
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        policy.call(failing, retryable=lambda e: True, deadline=10.0)
    assert len(calls) == 3
    assert sleeps == [0.004, 0.008]
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=3)


def test_retry_policy_stops_on_errors_it_may_not_retry() -> None:
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise KeyError("not transient")

    with pytest.raises(KeyError):
        RetryPolicy(sleep=lambda _: None).call(failing, retryable=lambda e: False, deadline=float("inf"))
    assert len(calls) == 1


def test_retry_policy_never_starts_an_attempt_that_would_overrun_the_deadline() -> None:
    now = [0.0]
    policy = RetryPolicy(rand=lambda: 1.0, base_ms=10, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    outcomes = iter([OSError("1"), OSError("2"), "ok"])

    def flaky() -> str:
        now[0] += 0.1  # each attempt takes 100 ms
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with pytest.raises(OSError, match="2"):
        policy.call(flaky, retryable=lambda e: True, deadline=0.3, attempt_s=0.1)
    assert now[0] == pytest.approx(0.21)


def test_store_counters_count_every_event_from_every_thread() -> None:
    counters = StoreCounters()
    per_thread = StoreCounters.FOLD_AT + 17

    def report(index: int) -> None:
        for _ in range(per_thread):
            counters.add("errors" if index % 2 else "retries")

    race(8, report)
    assert counters.snapshot() == {"retries": 4 * per_thread, "timeouts": 0, "connection_errors": 0,
                                   "errors": 4 * per_thread}
    with pytest.raises(KeyError):
        counters.add("misses")
