"""Compact JSON text, as ``JSON.stringify`` writes it, from encoders built once.

``json.dumps`` with any option builds a new ``JSONEncoder`` per call; on the callback path (some
16 documents per callback: envelopes, agent frames, audit lines) reusing one is measurably cheaper.
"""
from __future__ import annotations

import json
from typing import Any

_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"))
_COMPACT_FINITE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def compact(value: Any) -> str:
    """Compact JSON with non-ASCII text kept."""
    return _COMPACT.encode(value)


def compact_ascii(value: Any) -> str:
    """Compact JSON with non-ASCII text escaped (``\\uXXXX``)."""
    return _COMPACT_ASCII.encode(value)


def compact_finite(value: Any) -> str:
    """``compact``, refusing NaN and infinities (``ValueError``), which JSON cannot carry."""
    return _COMPACT_FINITE.encode(value)
