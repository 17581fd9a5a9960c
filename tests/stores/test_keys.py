"""Key layout and id escaping (``relay.stores.keys``)."""
from __future__ import annotations

import hashlib
import random
import re

import pytest

from relay.stores.domain import Domain, DomainStore
from relay.stores.envelope import EnvelopeSchema, ScalarSchema
from relay.stores.keys import ESCAPED_MEMO_ENTRIES, MAX_ESCAPED_ID, KeySpace, _escaped, escape_id
from relay.stores.memory import MemoryStore

ESCAPED = re.compile(r"%|[A-Za-z0-9._%-]+|~[0-9a-f]{64}")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("abc-DEF_1.2", "abc-DEF_1.2"),
        (":", "%3A"),
        ("a:b", "a%3Ab"),
        ("%", "%25"),
        ("a%3Ab", "a%253Ab"),
        (" ", "%20"),
        ("{x}", "%7Bx%7D"),
        ("*?[]", "%2A%3F%5B%5D"),
        ("#", "%23"),
        ("~", "%7E"),
        ("é", "%C3%A9"),
        ("名", "%E5%90%8D"),
        ("🙂", "%F0%9F%99%82"),
        ("\n", "%0A"),
        ("\ud800", "%ED%A0%80"),
        ("", "%"),
    ],
)
def test_escape_golden_vectors(raw: str, escaped: str) -> None:
    assert escape_id(raw) == escaped


def test_escaping_is_injective_and_never_emits_key_syntax() -> None:
    rng = random.Random(20241119)
    alphabet = "ab:%3A*{}[]?# ~é名🙂\n\t.-_"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(20_000)}
    ids |= {"x" * n for n in range(195, 215)} | {"é" * n for n in range(30, 40)}
    escaped = {escape_id(i) for i in ids}
    assert len(escaped) == len(ids)
    for e in escaped:
        assert ESCAPED.fullmatch(e), e
        assert len(e) <= MAX_ESCAPED_ID


def test_long_ids_are_replaced_by_their_hash() -> None:
    assert escape_id("a" * MAX_ESCAPED_ID) == "a" * MAX_ESCAPED_ID
    long = "a" * (MAX_ESCAPED_ID + 1)
    assert escape_id(long) == "~" + hashlib.sha256(long.encode()).hexdigest()
    assert escape_id("é" * 34).startswith("~")  # 34 characters, 204 escaped
    assert escape_id("x" * 5000) != escape_id("x" * 4999 + "y")


def test_ids_must_be_strings() -> None:
    with pytest.raises(TypeError):
        escape_id(42)  # type: ignore[arg-type]


def test_key_layout() -> None:
    keys = KeySpace("codexbridge", "prod")
    assert keys.key("machines", "m:1") == "codexbridge:prod:machines:m%3A1"
    assert keys.key("inflight", "m1", colocated=True) == "codexbridge:prod:{inflight}:m1"
    assert keys.index_key("audit", "recent") == "codexbridge:prod:audit:#recent"
    assert keys.prefix("audit") == "codexbridge:prod:audit:"


def test_index_keys_cannot_collide_with_record_keys() -> None:
    keys = KeySpace()
    records = {keys.key("d", i) for i in ["#recent", "%23recent", "recent"]}
    assert keys.index_key("d", "recent") not in records


@pytest.mark.parametrize("segment", ["", "Prod", "a:b", "a{b}", "1app", "a b", "x" * 65])
def test_app_env_and_domain_segments_are_validated(segment: str) -> None:
    with pytest.raises(ValueError):
        KeySpace(app=segment)
    with pytest.raises(ValueError):
        KeySpace(env=segment)
    with pytest.raises(ValueError):
        KeySpace().key(segment, "id")


@pytest.mark.parametrize("colocated", [False, True])
@pytest.mark.parametrize("raw", ["abc-DEF_1.2", "a:b", "{x}", "名", "", "x" * 300])
def test_a_domain_store_builds_the_key_space_keys_of_its_domain(colocated: bool, raw: str) -> None:
    keys = KeySpace("relay", "test")
    store = DomainStore(MemoryStore(), keys, Domain("audit", EnvelopeSchema(1, ScalarSchema()), colocated))
    assert store.key(raw) == keys.key("audit", raw, colocated)
    assert store.index_key(raw) == keys.index_key("audit", raw, colocated)


def test_escaped_ids_are_remembered_up_to_a_bound() -> None:
    first = escape_id("user 1/ä")
    hits = _escaped.cache_info().hits
    assert escape_id("user 1/ä") == first == "user%201%2F%C3%A4"
    assert _escaped.cache_info().hits == hits + 1
    assert _escaped.cache_info().maxsize == ESCAPED_MEMO_ENTRIES
    with pytest.raises(TypeError):
        escape_id(b"user 1")  # type: ignore[arg-type]
