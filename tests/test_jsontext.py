"""relay.jsontext writes what json.dumps writes with the same options, and refuses what it refuses."""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.agents.channel import _parse_frame
from relay.jsontext import compact, compact_ascii, compact_finite, parse_strict

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                             max_size=4), max_leaves=20)


def dumps(value: Any, **options: Any) -> str:
    return json.dumps(value, separators=(",", ":"), **options)


@given(DOCUMENTS)
def test_the_encoders_write_what_json_dumps_writes(value: Any) -> None:
    assert compact(value) == dumps(value, ensure_ascii=False)
    assert compact_ascii(value) == dumps(value)
    try:
        expected = dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        with pytest.raises(ValueError):
            compact_finite(value)
    else:
        assert compact_finite(value) == expected


@pytest.mark.parametrize("value", [math.nan, {"a": [math.inf]}, -math.inf])
def test_compact_finite_refuses_what_json_cannot_carry(value: Any) -> None:
    with pytest.raises(ValueError):
        compact_finite(value)
    assert compact(value) == dumps(value)


@pytest.mark.parametrize("value", [{1, 2}, {"a": object()}, b"bytes"])
def test_values_json_has_no_form_for_are_type_errors(value: Any) -> None:
    for encode in (compact, compact_ascii, compact_finite):
        with pytest.raises(TypeError):
            encode(value)


@given(DOCUMENTS.filter(lambda value: not _has_non_finite(value)))
def test_parse_strict_reads_what_json_loads_reads(value: Any) -> None:
    text = dumps(value)
    assert parse_strict(text) == json.loads(text)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(item) for item in value)
    if isinstance(value, dict):
        return any(_has_non_finite(item) for item in value.values())
    return False


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "", "{", "\ufeff{}", "[" * 100000])
def test_parse_strict_refuses_what_json_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_strict(text)


def test_an_agent_frame_nested_too_deeply_is_an_invalid_frame() -> None:
    assert _parse_frame("[" * 100000 + "]" * 100000) is None
