"""Compact JSON text, as ``JSON.stringify`` writes it, from encoders built once; and ``JSON.parse``
from one decoder built once.

``json.dumps`` with any option builds a new ``JSONEncoder`` per call, and ``JSONEncoder.encode``
builds a new C encoder per call too. The callback path writes some 16 documents per callback
(envelopes, agent frames, audit lines), so each kind here keeps one C encoder (``_json``), built
without the circular-reference check (the relay's documents are trees; a cycle would end in
``RecursionError`` rather than ``ValueError``). Without the C accelerator the plain encoder is used.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any


def _encoder(ensure_ascii: bool, allow_nan: bool) -> Callable[[Any], str]:
    plain = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":"), allow_nan=allow_nan,
                             check_circular=False)
    if c_make_encoder is None:
        return plain.encode
    chunks = c_make_encoder(None, plain.default, encode_basestring_ascii if ensure_ascii else encode_basestring,
                            None, ":", ",", False, False, allow_nan)
    return lambda value: "".join(chunks(value, 0))


#: Compact JSON with non-ASCII text kept.
compact = _encoder(ensure_ascii=False, allow_nan=True)
#: Compact JSON with non-ASCII text escaped (``\uXXXX``).
compact_ascii = _encoder(ensure_ascii=True, allow_nan=True)
#: ``compact``, refusing NaN and infinities (``ValueError``), which JSON cannot carry.
compact_finite = _encoder(ensure_ascii=False, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_strict_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def parse_strict(text: str) -> Any:
    """``JSON.parse``: ``json.loads`` refusing NaN and Infinity; raises ``ValueError``, also for
    nesting too deep to parse. ``json.loads`` with an option builds a new decoder per call."""
    try:
        return _strict_decoder.decode(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
