"""Versioned envelopes (``relay.stores.envelope``): encode, decode, upgrade, errors."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import marshmallow
import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import fields

from relay.stores.envelope import (
    WRITTEN_MEMO_ENTRIES,
    WRITTEN_MEMO_MAX_CHARS,
    EnvelopeError,
    EnvelopeSchema,
    ScalarSchema,
    iso_ms,
    parse_iso_ms,
    raw_updated_at_ms,
)

NOW_MS = 1_732_000_000_123
NOW_ISO = "2024-11-19T07:06:40.123Z"


class ItemV3(marshmallow.Schema):
    name = fields.String(required=True)
    tags = fields.List(fields.String(), required=True)
    count = fields.Integer(required=True)


ITEMS = EnvelopeSchema(
    3,
    ItemV3(),
    upgrades={
        1: lambda d: {"name": d["title"], "tags": []},
        2: lambda d: {**d, "count": len(d["tags"])},
    },
)


def envelope(version: object, data: object, updated_at: object = NOW_ISO) -> str:
    return json.dumps({"version": version, "updatedAt": updated_at, "data": data})


def test_time_format_golden_vectors() -> None:
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(NOW_MS) == NOW_ISO
    assert parse_iso_ms(NOW_ISO) == NOW_MS
    assert parse_iso_ms("2024-11-19T15:06:40.123+08:00") == NOW_MS


@given(st.integers(min_value=-10**12, max_value=4 * 10**12))
def test_times_round_trip_and_match_the_calendar(epoch_ms: int) -> None:
    text = iso_ms(epoch_ms)
    whole = datetime.fromtimestamp(epoch_ms // 1000, tz=timezone.utc)
    assert text == whole.strftime("%Y-%m-%dT%H:%M:%S") + f".{epoch_ms % 1000:03d}Z"
    assert parse_iso_ms(text) == epoch_ms


def test_encode_golden_vector() -> None:
    raw = EnvelopeSchema(1, ScalarSchema()).encode({"value": "é 名"}, NOW_MS)
    assert raw == '{"version":1,"updatedAt":"2024-11-19T07:06:40.123Z","data":{"value":"é 名"}}'


def test_decode_current_version() -> None:
    raw = ITEMS.encode({"name": "a", "tags": ["x"], "count": 1}, NOW_MS)
    entry = ITEMS.decode(raw)
    assert entry.data == {"name": "a", "tags": ["x"], "count": 1}
    assert entry.updated_at == NOW_ISO
    assert entry.raw == raw
    assert raw_updated_at_ms(raw) == NOW_MS


@pytest.mark.parametrize("raw", ["17", "not json", "[1]", json.dumps({"version": 1, "data": {}})])
def test_raw_updated_at_ms_is_none_for_anything_but_an_envelope(raw: str) -> None:
    assert raw_updated_at_ms(raw) is None


def test_decode_upgrades_through_every_version_in_order() -> None:
    assert ITEMS.decode(envelope(1, {"title": "old"})).data == {"name": "old", "tags": [], "count": 0}
    assert ITEMS.decode(envelope(2, {"name": "mid", "tags": ["a", "b"]})).data == {
        "name": "mid",
        "tags": ["a", "b"],
        "count": 2,
    }


def test_newer_version_is_an_unknown_version_error() -> None:
    with pytest.raises(EnvelopeError) as caught:
        ITEMS.decode(envelope(4, {"name": "future"}))
    assert caught.value.reason == "unknown_version"


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        json.dumps({"version": 3, "data": {}}),
        json.dumps({"version": 3, "updatedAt": NOW_ISO, "data": {}, "extra": 1}),
        envelope(True, {"name": "a", "tags": [], "count": 0}),
        envelope(0, {"name": "a", "tags": [], "count": 0}),
        envelope("3", {"name": "a", "tags": [], "count": 0}),
        envelope(3, {"name": "a", "tags": [], "count": 0}, updated_at=123),
        envelope(3, {"name": "a", "tags": [], "count": "many"}),
        envelope(3, {"name": "a", "tags": [], "count": 0, "unknown": 1}),
        envelope(1, {"no_title": "x"}),
        envelope(3, "a scalar"),
    ],
)
def test_corrupt_values_raise_corrupt(raw: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        ITEMS.decode(raw)
    assert caught.value.reason == "corrupt"


def test_encode_rejects_invalid_or_unserializable_data() -> None:
    with pytest.raises(ValueError, match="invalid data"):
        ITEMS.encode({"name": "a"}, NOW_MS)
    scalar = EnvelopeSchema(1, ScalarSchema())
    with pytest.raises(TypeError):
        scalar.encode({"value": {1, 2}}, NOW_MS)


def test_a_non_finite_number_is_stored_as_null_as_json_stringify_writes_it() -> None:
    raw = EnvelopeSchema(1, ScalarSchema()).encode({"value": [float("nan"), float("-inf"), 1.5]}, NOW_MS)
    assert json.loads(raw)["data"] == {"value": [None, None, 1.5]}
    assert EnvelopeSchema(1, ScalarSchema()).decode(raw).data == {"value": [None, None, 1.5]}


def test_schema_needs_an_upgrade_from_every_older_version() -> None:
    with pytest.raises(ValueError, match=r"\[2\]"):
        EnvelopeSchema(3, ItemV3(), upgrades={1: lambda d: d})


class CountingItems(EnvelopeSchema):
    """``ITEMS`` that counts how often data is validated."""

    def __init__(self) -> None:
        super().__init__(3, ItemV3(), upgrades=ITEMS.upgrades)
        self.validated = 0

    def errors(self, data: object) -> object:
        self.validated += 1
        return super().errors(data)


def test_a_text_this_schema_wrote_is_decoded_without_validating_it_again() -> None:
    schema = CountingItems()
    raw = schema.encode({"name": "a", "tags": [], "count": 0}, NOW_MS)
    assert schema.validated == 1
    assert schema.decode("".join([raw[:5], raw[5:]])).data == {"name": "a", "tags": [], "count": 0}
    assert schema.validated == 1


def test_texts_written_elsewhere_are_still_validated() -> None:
    schema = CountingItems()
    schema.encode({"name": "a", "tags": [], "count": 0}, NOW_MS)
    assert schema.decode(envelope(3, {"name": "b", "tags": [], "count": 0})).data["name"] == "b"
    assert schema.validated == 2
    with pytest.raises(EnvelopeError, match="does not match the schema"):
        schema.decode(envelope(3, {"name": "c", "tags": [], "count": "many"}))


def test_the_memo_keeps_only_the_newest_short_texts() -> None:
    schema = CountingItems()
    first = schema.encode({"name": "first", "tags": [], "count": 0}, NOW_MS)
    for n in range(WRITTEN_MEMO_ENTRIES):
        schema.encode({"name": f"n{n}", "tags": [], "count": n}, NOW_MS)
    long = schema.encode({"name": "x" * WRITTEN_MEMO_MAX_CHARS, "tags": [], "count": 0}, NOW_MS)
    written = schema.validated

    schema.decode(first)
    schema.decode(long)
    assert schema.validated == written + 2
    schema.decode(schema.encode({"name": f"n{WRITTEN_MEMO_ENTRIES - 1}", "tags": [], "count": WRITTEN_MEMO_ENTRIES - 1},
                                NOW_MS))
    assert schema.validated == written + 3
