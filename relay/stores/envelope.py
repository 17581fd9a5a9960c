"""Versioned envelopes: the only place that knows how stored values look.

Every value is JSON ``{"version": int, "updatedAt": iso8601-ms-Z, "data": ...}``.
A domain declares an ``EnvelopeSchema``: its current version, a marshmallow
schema for ``data`` and one upgrade function per older version. Reading an
older version upgrades it; a newer (unknown) version or a corrupt value raises
``EnvelopeError``, which ``DomainStore`` turns into a counted miss.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from typing import Any, Optional

import marshmallow
from marshmallow import fields as mfields
from marshmallow import validate as mvalidate

from relay.jsontext import compact, parse

Upgrade = Callable[[Any], Any]
#: How many texts each schema remembers having written, and the longest it remembers (characters).
WRITTEN_MEMO_ENTRIES = 512
WRITTEN_MEMO_MAX_CHARS = 4096
#: A quick check of ``data``: ``True`` only when marshmallow would accept it too.
Check = Callable[[Any], bool]


class EnvelopeError(ValueError):
    """A stored value could not be read; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a literal Z, as the reference writes times."""
    second, millis = divmod(epoch_ms, 1000)
    return f"{_iso_second(second)}.{millis:03d}Z"


@lru_cache(maxsize=8)
def _iso_second(epoch_s: int) -> str:
    """The date and time part of ``iso_ms``; a callback formats some 14 times within one second."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def parse_iso_ms(text: str) -> int:
    """Epoch ms from ``iso_ms`` output (or any ISO-8601 time with a zone)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


@dataclass(frozen=True)
class Entry:
    """A decoded value with what optimistic updates need."""

    data: Any
    updated_at: str
    #: The exact stored text; pass the entry back to ``compare_and_set``.
    raw: str


@dataclass
class EnvelopeSchema:
    """How one domain's values are validated and upgraded."""

    version: int
    data_schema: marshmallow.Schema
    upgrades: Mapping[int, Upgrade] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [v for v in range(1, self.version) if v not in self.upgrades]
        if missing:
            raise ValueError(f"no upgrade from version(s) {missing} to {self.version}")
        self._quick: Optional[Check] = quick_check(self.data_schema)
        #: Texts ``encode`` returned lately. Whether a text decodes to valid data depends on the text
        #: alone, and these hold data validated when they were written, so ``decode`` does not
        #: validate them again. Most reads return what this process wrote a moment before.
        self._written: OrderedDict[str, None] = OrderedDict()

    def errors(self, data: Any) -> Any:
        """marshmallow's validation errors for ``data`` (empty when valid). Data the quick check
        accepts skips marshmallow, which is the slow part of every store call."""
        if self._quick is not None and self._quick(data):
            return {}
        return self.data_schema.validate(_as_mapping(data))

    def encode(self, data: Any, now_ms: int) -> str:
        errors = self.errors(data)
        if errors:
            raise ValueError(f"invalid data for this domain: {errors}")
        try:
            text = compact({"version": self.version, "updatedAt": iso_ms(now_ms), "data": data})
        except TypeError as exc:
            raise TypeError(f"value is not JSON-serializable: {exc}") from exc
        if len(text) <= WRITTEN_MEMO_MAX_CHARS:
            written = self._written
            written[text] = None
            if len(written) > WRITTEN_MEMO_ENTRIES:
                written.popitem(last=False)
        return text

    def decode(self, raw: str) -> Entry:
        try:
            doc = parse(raw)
        except (TypeError, ValueError) as exc:
            raise EnvelopeError("corrupt", f"not JSON: {exc}") from exc
        if not isinstance(doc, dict) or set(doc) != {"version", "updatedAt", "data"}:
            raise EnvelopeError("corrupt", "not an envelope {version, updatedAt, data}")
        version, updated_at, data = doc["version"], doc["updatedAt"], doc["data"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise EnvelopeError("corrupt", f"bad envelope version {version!r}")
        if not isinstance(updated_at, str):
            raise EnvelopeError("corrupt", "bad updatedAt")
        if version > self.version:
            raise EnvelopeError("unknown_version", f"version {version} is newer than {self.version}")
        try:
            for v in range(version, self.version):
                data = self.upgrades[v](data)
        except Exception as exc:  # an upgrade meeting data it cannot handle is corruption
            raise EnvelopeError("corrupt", f"upgrade from version {v} failed: {exc}") from exc
        if raw not in self._written:
            errors = self.errors(data)
            if errors:
                raise EnvelopeError("corrupt", f"data does not match the schema: {errors}")
        return Entry(data=data, updated_at=updated_at, raw=raw)


def quick_check(schema: marshmallow.Schema) -> Optional[Check]:
    """A check accepting only data ``schema.validate`` accepts: declared fields of exact JSON types
    (``str`` for String, ``int`` but not ``bool`` for Integer, ...), required ones present, none
    other. ``None`` when the schema uses something it does not model (hooks, other field types or
    validators, renamed fields); a ``False`` answer means "ask marshmallow", never "invalid"."""
    if schema._hooks and any(schema._hooks.values()):
        return None
    #: Fields that must hold exactly one type (most of them) are compared inline; the rest are checked
    #: by a function each.
    exact: dict[str, type] = {}
    checks: dict[str, Check] = {}
    required = []
    for name, field_ in schema.fields.items():
        if field_.data_key not in (None, name) or field_.attribute not in (None, name):
            return None
        if field_.required:
            required.append(name)
        expected = _exact_type(field_)
        if expected is not None:
            exact[name] = expected
            continue
        check = _field_check(field_)
        if check is None:
            return None
        checks[name] = check
    allowed = frozenset(exact) | frozenset(checks)

    def valid(data: Any) -> bool:
        if type(data) is not dict or not allowed.issuperset(data):
            return False
        for name in required:
            if name not in data:
                return False
        for name, value in data.items():
            expected = exact.get(name)
            if expected is None:
                if not checks[name](value):
                    return False
            elif type(value) is not expected:
                return False
        return True

    return valid


def _exact_type(field_: mfields.Field) -> Optional[type]:
    """The one type every valid value of a plain ``String`` or ``Integer`` field has."""
    if field_.allow_none or field_.validators:
        return None
    if type(field_) is mfields.String:
        return str
    if type(field_) is mfields.Integer and not field_.strict:
        return int
    return None


def _field_check(field_: mfields.Field) -> Optional[Check]:
    """A quick check of one field's value, or ``None`` when the field is not modelled."""
    value_check: Optional[Check]
    if len(field_.validators) > 1 or (field_.validators and not isinstance(field_.validators[0], mvalidate.OneOf)):
        return None
    if type(field_) is mfields.String:
        value_check = _is_str
    elif type(field_) is mfields.Integer and not field_.strict:
        value_check = _is_int
    elif type(field_) is mfields.Raw:
        value_check = _anything
    elif type(field_) is mfields.Dict and isinstance(field_.key_field, mfields.String) \
            and isinstance(field_.value_field, mfields.String) and type(field_.key_field) is mfields.String \
            and type(field_.value_field) is mfields.String and not field_.key_field.validators \
            and not field_.value_field.validators:
        value_check = _is_str_dict
    elif type(field_) is mfields.Nested and isinstance(field_.schema, marshmallow.Schema) and not field_.many:
        value_check = quick_check(field_.schema)
    elif type(field_) is mfields.List and type(field_.inner) is mfields.Nested and not field_.validators:
        item = quick_check(field_.inner.schema) if not field_.inner.many else None
        value_check = None if item is None else _list_of(item)
    else:
        return None
    if value_check is None:
        return None
    if field_.validators:
        choices = frozenset(field_.validators[0].choices)
        base = value_check
        value_check = lambda value: base(value) and value in choices  # noqa: E731
    if field_.allow_none:
        inner = value_check
        return lambda value: value is None or inner(value)
    return value_check


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_int(value: Any) -> bool:
    return type(value) is int


def _anything(value: Any) -> bool:
    return value is not None


def _is_str_dict(value: Any) -> bool:
    return type(value) is dict and all(type(k) is str and type(v) is str for k, v in value.items())


def _list_of(item: Check) -> Check:
    return lambda value: type(value) is list and all(item(v) for v in value)


def _as_mapping(data: Any) -> Any:
    """marshmallow validates mappings; other JSON values are wrapped so they fail clearly."""
    if isinstance(data, Mapping):
        return data
    return {"__value__": data}


class ScalarSchema(marshmallow.Schema):
    """For domains whose data is one JSON scalar wrapped as ``{"value": ...}``."""

    value = marshmallow.fields.Raw(required=True, allow_none=True)


def comparable(raw: str) -> Any:
    """What two stored values are compared on: an envelope's ``data`` (``updatedAt`` ignored),
    or the raw text of anything else (counters)."""
    try:
        doc = parse(raw)
    except (TypeError, ValueError):
        return raw
    if isinstance(doc, dict) and set(doc) == {"version", "updatedAt", "data"}:
        return {"version": doc["version"], "data": doc["data"]}
    return raw


def raw_updated_at_ms(raw: str) -> Optional[int]:
    """The ``updatedAt`` of a stored envelope in epoch ms; ``None`` when it is not an envelope."""
    try:
        doc = parse(raw)
        return parse_iso_ms(doc["updatedAt"]) if isinstance(doc, dict) else None
    except (TypeError, ValueError, KeyError):
        return None
