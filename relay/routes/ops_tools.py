"""Operator tools behind ``require_admin``: reconcile a domain across backends, and a key inventory.

* ``GET /ops/store/reconcile/<domain>?repair=0|1&limit=N``: every key under the domain's prefix,
  on either backend, is compared between the authoritative backend (the domain's plan) and the
  other one, on the envelope's ``data`` as the shadow compare does (``middleware.shadow.compare``).
  The reply counts matches, keys missing from the other side, extra keys only on the other side
  and differing values, and lists up to ``limit`` (default 50) differing keys, hashed as the
  shadow sample hashes them, with the names of the differing fields (never values). With
  ``repair=1`` each missing or differing key is copied from the authoritative side with
  ``middleware.writeback.copy_newer`` (a newer value on the other side is kept, index members are
  merged; a different value with the same ``updatedAt`` is overwritten) and compared again; extra
  keys are left alone, since nothing is ever deleted here.
  Locks and rate-limit counters are counted as ``skipped``: they only mean something on the
  backend that decided them.
* ``GET /ops/store/inventory?sample=N``: per domain and backend, the key count (``scan_keys``),
  the records among them (keys that are not a domain index or lock) and an estimate of the memory
  they use: Redis ``MEMORY USAGE`` of up to ``sample`` (default 200) evenly spaced keys,
  extrapolated to all; for the memory backend the UTF-8 length of the keys and values (payload
  only, not the interpreter's object overhead). A backend that fails is reported with an error
  and the other still counted.

Both scan whole key prefixes, so they can take a while on large domains. With ``progress=1`` the
reply is NDJSON instead: ``{"progress": {"done", "total", ...}}`` lines while it works, then one
``{"result": {...}}`` line (or ``{"error": ...}`` if a backend failed midway).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Generator, Iterator
from typing import Any, Optional, Union

from flask import Blueprint, Response, stream_with_context

from middleware.observer import DIFFERENT, EXTRA, MATCH, MISSING
from middleware.routing import StoreRouter
from middleware.shadow import compare, redact_key
from middleware.writeback import FAILED, KEPT_NEWER, NOT_COPIED, SKIPPED, WRITTEN, copy_newer
from relay.routes.app_context import current_relay, query_value
from relay.routes.auth import require_admin
from relay.routes.responses import error_response, json_response
from relay.stores.base import Store, StoreError
from relay.stores.envelope import comparable, raw_updated_at_ms

DEFAULT_DIFF_LIMIT = 50
MAX_DIFF_LIMIT = 1000
DEFAULT_SAMPLE = 200
MAX_SAMPLE = 10_000
#: A progress line at most every this many keys (and at most every ``PROGRESS_INTERVAL_S``).
PROGRESS_EVERY = 500
PROGRESS_INTERVAL_S = 0.5
NDJSON_CONTENT_TYPE = "application/x-ndjson; charset=utf-8"

VALUE, INDEX, LOCK, COUNTER = "value", "index", "lock", "counter"

Step = dict[str, Any]

ops_tools_blueprint = Blueprint("ops_tools", __name__)
ops_tools_blueprint.before_request(require_admin)


class BadQuery(ValueError):
    """A query parameter the tools cannot use; ``code`` is the error of the 400 reply."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# -- classifying and reading keys ------------------------------------------------------------------
def key_kind(domain: str, prefix: str, key: str) -> str:
    """What a key under ``prefix`` holds: a lock, a domain index, a counter or an enveloped value."""
    rest = key[len(prefix):]
    if rest.startswith("#lock%3A"):
        return LOCK
    if rest.startswith("#"):
        return INDEX
    return COUNTER if domain in NOT_COPIED else VALUE


def _read(store: Store, key: str, kind: str) -> Any:
    """A key's content as ``compare`` takes it: the stored text, or an index as a member → score map."""
    if kind == INDEX:
        return dict(store.index_range(key)) or None
    return store.get(key)


def _data_fields(authoritative: Any, other: Any) -> list[str]:
    """``data.<name>`` for each top-level field of two envelopes' ``data`` that differs."""
    a, b = comparable(authoritative), comparable(other)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return []
    data_a, data_b = a.get("data"), b.get("data")
    if not (isinstance(data_a, dict) and isinstance(data_b, dict)):
        return []
    return sorted(f"data.{name}" for name in set(data_a) | set(data_b) if data_a.get(name) != data_b.get(name))[:20]


def compare_key(authoritative: Store, other: Store, key: str, kind: str) -> tuple[str, list[str]]:
    """``(outcome, differing fields)`` of one key, the authoritative side first (as in a shadow read)."""
    mine, theirs = _read(authoritative, key, kind), _read(other, key, kind)
    outcome, fields = compare(mine, theirs)
    if outcome == DIFFERENT and kind == VALUE:
        fields = sorted(set(fields) - {"data"} | set(_data_fields(mine, theirs))) or fields
    elif outcome == DIFFERENT and kind == INDEX:
        fields = ["members"] if set(mine) != set(theirs) else ["scores"]
    return outcome, fields


# -- reconcile ---------------------------------------------------------------------------------------
def _sides(router: StoreRouter, domain: str) -> tuple[str, str]:
    """``(authoritative, other)`` backend names of a domain."""
    authoritative = router.plans[domain].backend
    return authoritative, "memory" if authoritative == "redis" else "redis"


def reconcile_steps(router: StoreRouter, domain: str, repair: bool, limit: int) -> Iterator[Step]:
    """Progress steps, then the report, of reconciling ``domain``; ``StoreError`` if a backend fails."""
    auth_name, other_name = _sides(router, domain)
    authoritative, other = router.backends[auth_name], router.backends[other_name]
    prefix = router.prefix_of(domain)
    started = time.monotonic()
    auth_keys = authoritative.scan_keys(prefix)  # type: ignore[attr-defined]
    other_keys = other.scan_keys(prefix)  # type: ignore[attr-defined]
    keys = sorted(set(auth_keys) | set(other_keys))
    counts = {MATCH: 0, MISSING: 0, EXTRA: 0, DIFFERENT: 0, "skipped": 0}
    differing: list[tuple[str, str, str, list[str]]] = []
    ticker = _Ticker(len(keys), "compare")
    for done, key in enumerate(keys, 1):
        kind = key_kind(domain, prefix, key)
        if kind in (LOCK, COUNTER):
            counts["skipped"] += 1
        else:
            outcome, fields = compare_key(authoritative, other, key, kind)
            counts[outcome] += 1
            if outcome != MATCH:
                differing.append((key, kind, outcome, fields))
        step = ticker.tick(done)
        if step is not None:
            yield step
    report: Step = {
        "domain": domain, "pid": os.getpid(), "phase": router.plans[domain].phase,
        "authoritative": auth_name, "other": other_name,
        "keys": len(keys), "authoritativeKeys": len(auth_keys), "otherKeys": len(other_keys),
        "compared": len(keys) - counts["skipped"], **counts,
        "differences": [{"key": redact_key(key), "kind": kind, "outcome": outcome, "fields": fields}
                        for key, kind, outcome, fields in differing[:limit]],
        "truncated": len(differing) > limit,
        "repair": repair,
    }
    if repair:
        report["repaired"], remaining = yield from _repair(authoritative, other, differing)
        report["remaining"] = remaining
    report["elapsedS"] = round(time.monotonic() - started, 3)
    yield {"result": report}


def _repair(authoritative: Store, other: Store, differing: list[tuple[str, str, str, list[str]]]
            ) -> Generator[Step, None, tuple[dict[str, int], int]]:
    """Copy each missing or differing key from the authoritative side, then compare it again.

    A generator whose return value is ``(outcome counts, keys still differing)``.
    """
    outcomes = {WRITTEN: 0, KEPT_NEWER: 0, SKIPPED: 0, FAILED: 0}
    remaining = 0
    ticker = _Ticker(len(differing), "repair")
    for done, (key, kind, outcome, _fields) in enumerate(differing, 1):
        if outcome == EXTRA and kind != INDEX:
            outcomes[SKIPPED] += 1
            remaining += 1
        else:
            try:
                copied = copy_from_authoritative(authoritative, other, key, kind)
                still_differs = compare_key(authoritative, other, key, kind)[0] != MATCH
            except StoreError:
                copied, still_differs = FAILED, True
            outcomes[copied] += 1
            remaining += still_differs
        step = ticker.tick(done)
        if step is not None:
            yield step
    return {"written": outcomes[WRITTEN], "keptNewer": outcomes[KEPT_NEWER], "skipped": outcomes[SKIPPED],
            "errors": outcomes[FAILED]}, remaining


def copy_from_authoritative(authoritative: Store, other: Store, key: str, kind: str) -> str:
    """``copy_newer`` from the authoritative side; a value dated the same on both sides but different
    (which no later write explains) is overwritten too: the authoritative side wins the tie."""
    outcome = copy_newer(authoritative, other, key)
    if outcome != KEPT_NEWER or kind != VALUE:
        return outcome
    mine, theirs = authoritative.get(key), other.get(key)
    if mine is None or theirs is None or mine == theirs or raw_updated_at_ms(mine) != raw_updated_at_ms(theirs):
        return outcome
    return WRITTEN if other.compare_and_set(key, theirs, mine, authoritative.ttl_ms(key)) else KEPT_NEWER


class _Ticker:
    """Decides when a long loop reports progress: every ``PROGRESS_EVERY`` items or half second, and at the end."""

    def __init__(self, total: int, stage: str) -> None:
        self.total = total
        self.stage = stage
        self._last = time.monotonic()

    def tick(self, done: int) -> Optional[Step]:
        now = time.monotonic()
        if done == self.total or done % PROGRESS_EVERY == 0 or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            return {"progress": {"stage": self.stage, "done": done, "total": self.total}}
        return None


# -- inventory ---------------------------------------------------------------------------------------
def _payload_bytes(store: Store, key: str, kind: str) -> Optional[int]:
    """UTF-8 bytes of a key and what it holds, for a backend without ``MEMORY USAGE``."""
    size = len(key.encode("utf-8", "surrogatepass"))
    if kind == INDEX:
        return size + sum(len(m.encode("utf-8", "surrogatepass")) + 8 for m, _ in store.index_range(key))
    if kind == COUNTER:
        return size + 8
    value = store.get(key)
    return None if value is None else size + len(value.encode("utf-8", "surrogatepass"))


def _sample(keys: list[str], size: int) -> list[str]:
    """Up to ``size`` keys spread evenly over the sorted list."""
    if len(keys) <= size:
        return keys
    step = len(keys) / size
    return [keys[int(i * step)] for i in range(size)]


def backend_inventory(store: Store, domain: str, prefix: str, sample: int) -> Step:
    """Key count, record count and estimated memory of one domain on one backend."""
    keys = store.scan_keys(prefix)  # type: ignore[attr-defined]
    records = sum(1 for key in keys if not key.startswith("#", len(prefix)))
    memory_usage = getattr(store, "memory_usage", None)
    sized = []
    for key in _sample(keys, sample):
        size = memory_usage(key) if memory_usage is not None else _payload_bytes(store, key, key_kind(domain, prefix,
                                                                                                       key))
        if size is not None:
            sized.append(size)
    estimate = round(sum(sized) / len(sized) * len(keys)) if sized else 0
    return {"keys": len(keys), "records": records, "bytes": estimate, "sampled": len(sized),
            "method": "memory_usage" if memory_usage is not None else "payload_length"}


def inventory_steps(router: StoreRouter, sample: int) -> Iterator[Step]:
    """Progress steps, then the inventory of every domain on every backend."""
    domains: dict[str, Any] = {}
    pairs = [(domain, name) for domain in router.plans for name in router.backends]
    ticker = _Ticker(len(pairs), "inventory")
    started = time.monotonic()
    for done, (domain, name) in enumerate(pairs, 1):
        plan = router.plans[domain]
        entry = domains.setdefault(domain, {"phase": plan.phase, "authoritative": plan.backend, "backends": {}})
        try:
            entry["backends"][name] = backend_inventory(router.backends[name], domain, router.prefix_of(domain),
                                                        sample)
        except StoreError as exc:
            entry["backends"][name] = {"error": "store_unavailable", "detail": type(exc).__name__}
        step = ticker.tick(done)
        if step is not None:
            yield step
    totals: dict[str, dict[str, int]] = {}
    for entry in domains.values():
        for name, figures in entry["backends"].items():
            if "error" not in figures:
                total = totals.setdefault(name, {"keys": 0, "records": 0, "bytes": 0})
                for field in total:
                    total[field] += figures[field]
    yield {"result": {"sample": sample, "domains": domains, "totals": totals,
                      "elapsedS": round(time.monotonic() - started, 3)}}


# -- HTTP ----------------------------------------------------------------------------------------------
def _int_query(name: str, default: int, maximum: int) -> int:
    raw = query_value(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise BadQuery(f"invalid_{name}")
    return int(raw)


def _flag_query(name: str) -> bool:
    raw = query_value(name)
    if raw in (None, "", "0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise BadQuery(f"invalid_{name}")


def _reply(steps: Iterator[Step], progress: bool) -> Response:
    """The final report as JSON, or every step as NDJSON with ``progress=1``."""
    if progress:
        def lines() -> Iterator[str]:
            try:
                for step in steps:
                    yield json.dumps(step, separators=(",", ":")) + "\n"
            except StoreError as exc:
                yield json.dumps({"error": "store_unavailable", "detail": type(exc).__name__}) + "\n"

        return Response(stream_with_context(lines()), status=200, content_type=NDJSON_CONTENT_TYPE)
    try:
        result: Union[Step, None] = None
        for step in steps:
            result = step.get("result", result)
    except StoreError:
        return error_response(503, "store_unavailable")
    return json_response(200, result)


@ops_tools_blueprint.get("/ops/store/reconcile/<domain>")
def reconcile(domain: str) -> Response:
    router = current_relay().router
    if domain not in router.plans:
        return error_response(404, "unknown_domain")
    if "redis" not in router.backends:
        return error_response(409, "redis_not_configured")
    try:
        repair, progress = _flag_query("repair"), _flag_query("progress")
        limit = _int_query("limit", DEFAULT_DIFF_LIMIT, MAX_DIFF_LIMIT)
    except BadQuery as exc:
        return error_response(400, exc.code)
    return _reply(reconcile_steps(router, domain, repair, limit), progress)


@ops_tools_blueprint.get("/ops/store/inventory")
def inventory() -> Response:
    try:
        progress = _flag_query("progress")
        sample = _int_query("sample", DEFAULT_SAMPLE, MAX_SAMPLE)
    except BadQuery as exc:
        return error_response(400, exc.code)
    return _reply(inventory_steps(current_relay().router, sample), progress)
