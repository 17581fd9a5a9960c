"""Namespaced keys: ``<app>:<env>:<domain>:<id>``.

Ids come from the outside world (WeCom user ids, machine ids, message ids), so
they are escaped before they become part of a key:

* characters outside ``[A-Za-z0-9._-]`` become ``%XX`` (UTF-8 bytes, upper-case
  hex), ``%`` included, so escaping is injective: two different ids never give
  the same key, and an id can never add a ``:`` segment, a glob character
  (``*?[]``) or a Redis Cluster hash tag (``{}``);
* an escaped id longer than ``MAX_ESCAPED_ID`` is replaced by ``~`` plus the
  SHA-256 of the raw id. ``~`` is itself always escaped, so hashed and
  unhashed ids cannot collide.

Cluster safety: a domain whose records are updated together with a domain
index (``colocated=True``) puts the domain segment in a hash tag,
``<app>:<env>:{<domain>}:<id>``, so a record and its index live in one slot and
one Lua script may touch both. Other domains spread over all slots.
See ``docs/keys.md``.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Optional

MAX_ESCAPED_ID = 200
#: How many escaped ids are remembered.
ESCAPED_MEMO_ENTRIES = 4096
_SAFE = re.compile(r"[A-Za-z0-9._-]")
#: Ids that escape to themselves (the common case: uuids, WeCom ids), recognised in one match.
_PLAIN = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_ESCAPED_ID)
_SEGMENT = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def escape_id(raw: str) -> str:
    """Escape one id for use as the last key segment."""
    if not isinstance(raw, str):
        raise TypeError(f"key ids are strings, got {type(raw).__name__}")
    return _escaped(raw)


@lru_cache(maxsize=ESCAPED_MEMO_ENTRIES)
def _escaped(raw: str) -> str:
    """``escape_id`` of a string, remembered: a callback escapes its few ids some 20 times."""
    if _PLAIN.fullmatch(raw):
        return raw
    out = []
    for ch in raw:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    escaped = "".join(out)
    if not escaped:
        return "%"  # the empty id; a lone "%" cannot come from escaping anything else
    if len(escaped) > MAX_ESCAPED_ID:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()
        return "~" + digest
    return escaped


class KeySpace:
    """Builds keys for one application and environment."""

    def __init__(self, app: str = "codexbridge", env: str = "dev") -> None:
        for name, value in (("app", app), ("env", env)):
            if not _SEGMENT.match(value):
                raise ValueError(
                    f"key {name} {value!r} must be lower-case letters, digits, '_' or '-', "
                    "starting with a letter"
                )
        self.app = app
        self.env = env
        #: Prefixes built so far: a callback builds some twenty keys.
        self._prefixes: dict[tuple[str, bool], str] = {}

    def prefix(self, domain: str, colocated: bool = False) -> str:
        prefix = self._prefixes.get((domain, colocated))
        if prefix is None:
            if not _SEGMENT.match(domain):
                raise ValueError(f"invalid domain name {domain!r}")
            segment = "{" + domain + "}" if colocated else domain
            prefix = self._prefixes[(domain, colocated)] = f"{self.app}:{self.env}:{segment}:"
        return prefix

    def key(self, domain: str, id_: str, colocated: bool = False) -> str:
        return self.prefix(domain, colocated) + escape_id(id_)

    def index_key(self, domain: str, name: str, colocated: bool = False) -> str:
        """A domain-wide structure (sorted index, lock). ``#`` cannot appear in escaped ids."""
        return self.prefix(domain, colocated) + "#" + escape_id(name)


#: Marks a domain-wide key that describes only the backend holding it (``index_key("local:...")``):
#: routing writes it to the authoritative backend alone, and copies between backends leave it.
LOCAL_MARK = ":#local%3A"


def backend_local(key: Optional[str]) -> bool:
    """Whether ``key`` is a ``#local:`` key (``LOCAL_MARK``)."""
    return key is not None and LOCAL_MARK in key


def watermark_key(index_key: str) -> str:
    """The watermark kept over the index ``index_key`` (``Store.watermark_begin``): the ``#local:`` key
    ``#local:watermark.<name>`` beside it, in the same hash slot."""
    head, _, name = index_key.rpartition(":#")
    return head + LOCAL_MARK + "watermark." + name


#: ``escape_id`` in Lua, for scripts that derive a record key from an index member. Returns ``nil``
#: where ``escape_id`` would hash the id (Redis Lua has no SHA-256); the caller handles those ids.
LUA_ESCAPE_ID = """
local function escape_id(id)
  if id == '' then return '%%' end
  local out = string.gsub(id, '[^A-Za-z0-9._-]', function(c) return string.format('%%%%%%02X', string.byte(c)) end)
  if #out > %d then return nil end
  return out
end
""" % MAX_ESCAPED_ID

