"""relay.jsontext writes what JSON.stringify writes and reads what JSON.parse reads, through orjson,
and gives what orjson refuses to the standard library."""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.agents.channel import _parse_frame
from relay.jsontext import compact, compact_ascii, compact_bytes, parse, parse_strict

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                             max_size=4), max_leaves=20)
#: Documents without floats, whose text does not depend on how a float is formatted.
WHOLE_DOCUMENTS = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                           max_size=4), max_leaves=20)

#: What orjson reads exactly as json.loads does: finite floats, integers within 64 bits.
PARSEABLE = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                         | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                         lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                         max_leaves=20)


def dumps(value: Any, **options: Any) -> str:
    return json.dumps(value, separators=(",", ":"), **options)


def js(value: Any) -> Any:
    """``value`` as JSON.stringify sees it: NaN and the infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [js(item) for item in value]
    if isinstance(value, dict):
        return {key: js(item) for key, item in value.items()}
    return value


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


@given(WHOLE_DOCUMENTS)
def test_without_floats_the_text_is_what_json_dumps_writes(value: Any) -> None:
    assert compact(value) == dumps(value, ensure_ascii=False)
    assert compact_ascii(value) == dumps(value)


@given(DOCUMENTS)
def test_every_document_reads_back_as_json_stringify_wrote_it(value: Any) -> None:
    assert json.loads(compact(value)) == js(value)
    assert compact_ascii(value) == dumps(js(value))


@given(DOCUMENTS)
def test_the_bytes_are_the_text_in_utf8(value: Any) -> None:
    text = compact(value)
    if has_lone_surrogate(text):
        with pytest.raises(UnicodeEncodeError):
            compact_bytes(value)
    else:
        assert compact_bytes(value) == text.encode("utf-8")


@pytest.mark.parametrize("value, text", [
    (math.nan, "null"),
    ({"a": [math.inf, 1.5]}, '{"a":[null,1.5]}'),
    ([-math.inf, 2**70], f"[null,{2**70}]"),  # the second goes through the standard library
    (1e-7, "1e-7"),
    (0.1, "0.1"),
])
def test_numbers_are_written_as_json_stringify_writes_them(value: Any, text: str) -> None:
    assert compact(value) == text
    assert compact_bytes(value) == text.encode()


@pytest.mark.parametrize("value", [
    {"big": 2**64, "small": -(2**63) - 1},
    {1: "int key", "s": "str key"},
    {type("Key", (str,), {})("k"): "a str subclass as a key"},
    ["lone \ud800 surrogate", "é"],
])
def test_what_orjson_refuses_is_written_by_the_standard_library(value: Any) -> None:
    assert compact(value) == dumps(value, ensure_ascii=False)
    assert compact_ascii(value) == dumps(value)


@pytest.mark.parametrize("value", [{1, 2}, {"a": object()}, b"bytes"])
def test_values_json_has_no_form_for_are_type_errors(value: Any) -> None:
    for encode in (compact, compact_bytes, compact_ascii):
        with pytest.raises(TypeError):
            encode(value)


@given(PARSEABLE)
def test_parse_strict_reads_what_json_loads_reads(value: Any) -> None:
    text = dumps(value)
    expected = json.loads(text)
    assert parse_strict(text) == expected
    assert parse_strict(text.encode()) == expected
    assert parse(text) == expected


def test_integers_beyond_64_bits_are_read_as_json_parse_reads_them() -> None:
    assert parse_strict(str(2**70)) == float(2**70)


def test_an_escaped_lone_surrogate_is_read_as_json_parse_reads_it() -> None:
    assert parse_strict('["\\ud800", "é"]') == ["\ud800", "é"]


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "", "{", "\ufeff{}", "[" * 100000,
                                  b"\xff[]"])
def test_parse_strict_refuses_what_json_parse_refuses(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_strict(text)


def test_parse_reads_the_constants_json_loads_reads() -> None:
    assert math.isnan(parse('{"a": NaN}')["a"])


def test_an_agent_frame_nested_too_deeply_is_an_invalid_frame() -> None:
    assert _parse_frame("[" * 100000 + "]" * 100000) is None
