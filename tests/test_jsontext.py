"""relay.jsontext writes what json.dumps writes with the same options, and refuses what it refuses."""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.jsontext import compact, compact_ascii, compact_finite

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
