"""Versioned envelopes: the only place that knows how stored values look.

Every value is JSON ``{"version": int, "updatedAt": iso8601-ms-Z, "data": ...}``.
A domain declares an ``EnvelopeSchema``: its current version, a marshmallow
schema for ``data`` and one upgrade function per older version. Reading an
older version upgrades it; a newer (unknown) version or a corrupt value raises
``EnvelopeError``, which ``DomainStore`` turns into a counted miss.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import marshmallow

Upgrade = Callable[[Any], Any]


class EnvelopeError(ValueError):
    """A stored value could not be read; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a literal Z, as the reference writes times."""
    dt = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


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

    def encode(self, data: Any, now_ms: int) -> str:
        errors = self.data_schema.validate(_as_mapping(data))
        if errors:
            raise ValueError(f"invalid data for this domain: {errors}")
        try:
            return json.dumps(
                {"version": self.version, "updatedAt": iso_ms(now_ms), "data": data},
                ensure_ascii=False,
                separators=(",", ":"),
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise TypeError(f"value is not JSON-serializable: {exc}") from exc

    def decode(self, raw: str) -> Entry:
        try:
            doc = json.loads(raw)
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
        errors = self.data_schema.validate(_as_mapping(data))
        if errors:
            raise EnvelopeError("corrupt", f"data does not match the schema: {errors}")
        return Entry(data=data, updated_at=updated_at, raw=raw)


def _as_mapping(data: Any) -> Any:
    """marshmallow validates mappings; other JSON values are wrapped so they fail clearly."""
    if isinstance(data, Mapping):
        return data
    return {"__value__": data}


class ScalarSchema(marshmallow.Schema):
    """For domains whose data is one JSON scalar wrapped as ``{"value": ...}``."""

    value = marshmallow.fields.Raw(required=True)


def comparable(raw: str) -> Any:
    """What two stored values are compared on: an envelope's ``data`` (``updatedAt`` ignored),
    or the raw text of anything else (counters)."""
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError):
        return raw
    if isinstance(doc, dict) and set(doc) == {"version", "updatedAt", "data"}:
        return {"version": doc["version"], "data": doc["data"]}
    return raw


def raw_updated_at_ms(raw: str) -> Optional[int]:
    """The ``updatedAt`` of a stored envelope in epoch ms; ``None`` when it is not an envelope."""
    try:
        doc = json.loads(raw)
        return parse_iso_ms(doc["updatedAt"]) if isinstance(doc, dict) else None
    except (TypeError, ValueError, KeyError):
        return None
