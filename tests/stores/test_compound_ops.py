"""``index_add_capped``, ``guarded_reserve`` and ``execute``: the same answers on every backend, and
``escape_id``'s Lua twin, which derives record keys inside Redis, agreeing with it."""
from __future__ import annotations

from collections.abc import Iterator

import marshmallow
import pytest
from marshmallow import fields, validate

from middleware.breaker import GuardedBreaker
from relay.domains import audit, inflight, locale, machines, templates
from relay.stores.base import Claim, CounterGuard, Op, Store
from relay.stores.envelope import EnvelopeSchema, quick_check
from relay.stores.keys import LUA_ESCAPE_ID, MAX_ESCAPED_ID, escape_id
from relay.stores.memory import MemoryStore
from relay.stores.redis import RedisStore
from tests.support.redisproc import RedisServer

PREFIX = "t:dev:{audit}:"
INDEX = PREFIX + "#updated"


@pytest.fixture(params=["memory", "redis", "redis-two-steps"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, breaker=GuardedBreaker(),
                             cross_slot_scripts=request.param == "redis")
    yield redis_store
    redis_store.close()


def test_index_add_capped_drops_the_oldest_with_their_records(store: Store) -> None:
    ids = ["a", "b c", "ü", "d"]
    for n, id_ in enumerate(ids):
        store.set(PREFIX + escape_id(id_), f"record {n}")
        assert store.index_add_capped(INDEX, {id_: float(n)}, 2, PREFIX) == ([] if n < 2 else [ids[n - 2]])
    assert [m for m, _ in store.index_range(INDEX)] == ["d", "ü"]
    assert store.get(PREFIX + escape_id("a")) is None and store.get(PREFIX + escape_id("b c")) is None
    assert store.get(PREFIX + escape_id("ü")) == "record 2"


def test_index_add_capped_deletes_records_of_hashed_ids_too(store: Store) -> None:
    long_id = "x/" * MAX_ESCAPED_ID
    store.set(PREFIX + escape_id(long_id), "old")
    store.index_add_capped(INDEX, {long_id: 1.0}, 5, PREFIX)
    assert store.index_add_capped(INDEX, {"new": 2.0}, 1, PREFIX) == [long_id]
    assert store.get(PREFIX + escape_id(long_id)) is None


def test_guarded_reserve_reserves_only_within_the_limit(store: Store) -> None:
    guard = CounterGuard("t:dev:ratelimit:u1", 1, 60_000, 2)
    assert store.guarded_reserve(guard, "t:dev:idempotency:m1", "v1", 60_000) == (1, True)
    assert store.guarded_reserve(guard, "t:dev:idempotency:m1", "v2", 60_000) == (2, False)
    assert store.guarded_reserve(guard, "t:dev:idempotency:m2", "v3", 60_000) == (3, False)
    assert store.get("t:dev:idempotency:m1") == "v1"
    assert store.get("t:dev:idempotency:m2") is None
    assert 0 < (store.ttl_ms("t:dev:ratelimit:u1") or 0) <= 60_000


def test_execute_runs_in_order_and_answers_like_single_calls(store: Store) -> None:
    results = store.execute([
        Op("set", ("k", "v", None)),
        Op("get", ("k",)),
        Op("set_if_absent", ("k", "w", None)),
        Op("incr", ("c", 2, 1000)),
        Op("index_add", ("i", {"m": 1.5})),
        Op("index_range", ("i", None, True, None, None)),
        Op("index_count", ("i",)),
        Op("compare_and_set", ("k", "v", "w", None)),
        Op("mget", (["k", "missing"],)),
        Op("compare_and_set_then_claim", ("r", None, "x", None, Claim("k", "w", "i", "m"))),
        Op("compare_and_set_then_claim", ("r", None, "y", None, Claim("c", "2", "i", "m"))),
        Op("delete", ("r", "k", "c")),
        Op("index_add_each", ({"i": {"n": 2.5}, "j": {"n": 1.0}, "l": {}},)),
        Op("index_add_each", ({},)),
        Op("index_range", ("j", None, True, None, None)),
    ])
    assert results == [None, "v", False, 2, None, [("m", 1.5)], 1, True, ["w", None], (True, True), (False, False),
                       2, None, None, [("n", 1.0)]]
    assert store.index_range("i") == [("n", 2.5)]


def test_execute_checks_every_argument_before_sending_anything(store: Store) -> None:
    with pytest.raises(ValueError):
        store.execute([Op("set", ("k", "v", None)), Op("set", ("k2", "v", -5))])
    if isinstance(store, RedisStore):
        assert store.get("k") is None


@pytest.mark.parametrize("raw", ["", "plain-id_1.2", "a b", "%", "~x", "ü€😀", "a:b{c}*?[]", "x" * 200, "é" * 66,
                                 "é" * 67])
def test_lua_escape_matches_escape_id(redis_server: RedisServer, raw: str) -> None:
    client = redis_server.client()
    try:
        lua = client.eval(LUA_ESCAPE_ID + "return escape_id(ARGV[1])", 0, raw)
    finally:
        client.close()
    expected = escape_id(raw)
    assert lua == (None if expected.startswith("~") else expected)


class _Sample(marshmallow.Schema):
    name = fields.String(required=True)
    count = fields.Integer()
    tags = fields.Dict(keys=fields.String(), values=fields.String())
    mode = fields.String(validate=validate.OneOf(("a", "b")), allow_none=True)


@pytest.mark.parametrize("data", [
    {"name": "x"}, {"name": "x", "count": 3}, {"name": "x", "count": "3"}, {"name": "x", "count": True},
    {"name": "x", "count": 2.0}, {"name": 1}, {}, {"name": "x", "extra": 1}, {"name": "x", "tags": {"a": "b"}},
    {"name": "x", "tags": {"a": 1}}, {"name": "x", "mode": None}, {"name": "x", "mode": "c"}, [], "text", None,
])
def test_quick_check_never_accepts_what_marshmallow_refuses(data: object) -> None:
    schema = _Sample()
    check = quick_check(schema)
    assert check is not None
    if check(data):
        assert schema.validate(data) == {}
    assert EnvelopeSchema(1, schema).errors(data) == (schema.validate(data) if isinstance(data, dict)
                                                      else schema.validate({"__value__": data}))


@pytest.mark.parametrize("domain", [audit.DOMAIN, inflight.DOMAIN, locale.DOMAIN, machines.DOMAIN, templates.DOMAIN])
def test_every_domain_schema_has_a_quick_check(domain: object) -> None:
    assert quick_check(domain.schema.data_schema) is not None  # type: ignore[attr-defined]
