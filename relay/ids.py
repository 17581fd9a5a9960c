"""Ids from the outside world (msgId, userId, machineId, commandId), checked before they become
store keys or log fields.

Keys escape every id anyway (``relay.stores.keys``); this check keeps ids a sane size and free of
characters that mean something to a terminal, a log viewer or a bidi-aware display: control and
format characters (C0, DEL, C1, zero-width and direction marks), lone surrogates and line or
paragraph separators. Letters of any script, digits, punctuation and spaces are fine.
"""
from __future__ import annotations

import unicodedata
from typing import Any

MAX_ID_LENGTH = 128
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def valid_id(value: Any) -> bool:
    """A non-empty string of at most 128 characters, none of them control or format characters."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        return False
    if value.isascii():
        # The only refused ASCII characters are the controls (C0 and DEL), which isprintable refuses.
        return value.isprintable()
    return not any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in value)
