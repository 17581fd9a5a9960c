"""Store flags changed at runtime, applied by every worker of every instance (docs/migration.md).

``RuntimeFlags`` layers *overrides* (flag variable name → text, exactly like an
environment variable) over the flag environment the relay started with, resolves
them with ``config.phases.resolve_plans`` and hands the plans to the router.

Overrides come from up to three places:

* the Redis document ``<STORE_APP>:<STORE_ENV>:flags:#overrides``
  (``{"version": n, "flags": {...}, "updatedAt": iso}``), shared by every process;
* the file ``STORE_FLAGS_FILE`` (a JSON object of flag names to values);
* a ``PUT /ops/store/flags`` that neither of them could keep (this process only).

The overrides in force are those of the most recently written of the three (the
document's ``updatedAt``, the file's modification time); the environment is below
all of them. A PUT merges into the overrides in force and writes the result to
every configured channel with one timestamp, later than any it has seen, so a
newer change always wins wherever it was made, and a change written to the file
during a Redis outage is not undone when Redis answers again with an older
document. Every process polls both channels once a second.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from config.phases import DomainPlan, FlagError, flag_names
from config.settings import ConfigError, Settings
from middleware.routing import StoreRouter
from relay.stores.base import Store, StoreError
from relay.stores.envelope import iso_ms, parse_iso_ms
from relay.stores.keys import KeySpace

log = logging.getLogger("relay.store.flags")

REDIS, FILE, LOCAL = "redis", "file", "local"
WRITTEN, FAILED, NOT_CONFIGURED = "written", "failed", "not_configured"
#: Tie-break between overrides written in the same millisecond (they hold the same flags after a PUT).
_RANK = {REDIS: 2, FILE: 1, LOCAL: 0}
_CAS_ATTEMPTS = 8
#: The flags that can put a domain's state, or its reads, in process memory.
_MEMORY_FLAGS = ("_PHASE", "_BACKEND", "_READ_PREFERENCE")

PlansChanged = Callable[[Mapping[str, DomainPlan], Mapping[str, DomainPlan]], Any]


class FlagsRejected(ValueError):
    """A flag change refused as a whole; ``details`` maps variable names to what they accept."""

    def __init__(self, details: Mapping[str, str], accepted: Optional[list[str]] = None) -> None:
        self.details = dict(details)
        self.accepted = accepted
        super().__init__("; ".join(f"{k}: {v}" for k, v in sorted(self.details.items())))

    def as_dict(self) -> dict[str, Any]:
        """The 400 body of ``PUT /ops/store/flags``."""
        body: dict[str, Any] = {"error": "invalid_store_flags", "details": self.details}
        if self.accepted is not None:
            body["accepted"] = self.accepted
        return body


@dataclass(frozen=True)
class Overrides:
    """One validated set of overrides and where it came from."""

    source: str
    flags: Mapping[str, str]
    updated_at_ms: int
    plans: Mapping[str, DomainPlan]
    version: Optional[int] = None

    def order(self) -> tuple[int, int]:
        return self.updated_at_ms, _RANK[self.source]


@dataclass(frozen=True)
class UpdateResult:
    """What a PUT did: the overrides now in force, where they were written, which domains changed."""

    overrides: Mapping[str, str]
    version: Optional[int]
    updated_at_ms: int
    channels: Mapping[str, str]
    changed: Mapping[str, tuple[DomainPlan, DomainPlan]]

    @property
    def persisted(self) -> bool:
        """Every configured channel was written (``False`` when none is configured)."""
        configured = [state for state in self.channels.values() if state != NOT_CONFIGURED]
        return bool(configured) and all(state == WRITTEN for state in configured)

    def as_dict(self) -> dict[str, Any]:
        return {
            "persisted": self.persisted,
            "failed": sorted(name for name, state in self.channels.items() if state == FAILED),
            "channels": dict(self.channels),
            "overrides": dict(self.overrides),
            "version": self.version,
            "updatedAt": iso_ms(self.updated_at_ms),
            "changed": {domain: {"old": old.as_flags(), "new": new.as_flags()}
                        for domain, (old, new) in self.changed.items()},
        }


@dataclass
class _ChannelState:
    state: str = "unknown"
    error: Optional[str] = None


@dataclass
class _FileRead:
    """One look at the flags file: its content and signature, or why there is none."""

    content: Optional[bytes] = None
    mtime_ns: int = 0
    error: Optional[str] = None

    @property
    def signature(self) -> tuple[Any, ...]:
        return (self.content, self.mtime_ns, self.error)


_NEVER = object()


def parse_overrides(raw: Any) -> dict[str, Optional[str]]:
    """Flag names to text from a JSON object; ``None`` (JSON null) means "no override".

    Strings are taken as they are (blank means "unset", hiding the environment's value),
    booleans become ``true``/``false`` and numbers their decimal text. Raise ``FlagsRejected``
    naming every unknown name and every value of another type.
    """
    if not isinstance(raw, dict):
        raise FlagsRejected({"body": "accepts a JSON object of store flag names to values"}, flag_names())
    known = set(flag_names())
    unknown = {name: "is not a store flag" for name in raw if name not in known}
    if unknown:
        raise FlagsRejected(unknown, flag_names())
    out: dict[str, Optional[str]] = {}
    errors: dict[str, str] = {}
    for name, value in raw.items():
        if value is None:
            out[name] = None
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (int, float)):
            out[name] = repr(value)
        elif isinstance(value, str):
            out[name] = value.strip()
        else:
            errors[name] = "accepts a string, number, boolean or null"
    if errors:
        raise FlagsRejected(errors)
    return out


def _document_version(raw: Optional[str]) -> int:
    """The ``version`` of a stored overrides document; 0 when absent or unreadable."""
    try:
        version = json.loads(raw)["version"] if raw is not None else 0
    except (ValueError, KeyError, TypeError):
        return 0
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def overrides_key(settings: Settings) -> str:
    """``<STORE_APP>:<STORE_ENV>:flags:#overrides``."""
    return KeySpace(settings.store_app, settings.store_env).index_key("flags", "overrides")


class RuntimeFlags:
    """The flag overrides of this process: validation, application, persistence and polling."""

    def __init__(
        self,
        settings: Settings,
        router: StoreRouter,
        *,
        on_change: Optional[PlansChanged] = None,
        interval_s: float = 1.0,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._settings = settings
        self._router = router
        self._on_change = on_change
        self.interval_s = interval_s
        self._clock_ms = clock_ms
        self._redis: Optional[Store] = router.backends.get("redis") if settings.redis_url else None
        self._key = overrides_key(settings)
        self._path = settings.flags_file
        self._lock = threading.Lock()
        self._generation = 0
        self._sets: dict[str, Optional[Overrides]] = {REDIS: None, FILE: None, LOCAL: None}
        self._redis_seen: Any = _NEVER
        self._file_seen: Any = _NEVER
        self._channels = {REDIS: _ChannelState(), FILE: _ChannelState()}
        self._in_force: Optional[Overrides] = None
        self.changes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- validation ---------------------------------------------------------------------------------
    def validate(self, flags: Mapping[str, str], blame: Collection[str] = ()) -> dict[str, DomainPlan]:
        """Plans for the environment with ``flags`` on top; raise ``FlagsRejected`` when they cannot run.

        ``blame`` names the variables to hold responsible when the plans would keep or read
        state in process memory while several workers run.
        """
        try:
            plans = self._settings.resolve_flags(flags)
        except FlagError as exc:
            details = dict(exc.errors)
            if not set(details) & set(blame):
                details.update({name: f"cannot be applied: see {', '.join(sorted(exc.errors))}" for name in blame})
            raise FlagsRejected(details) from None
        missing = sorted({b for plan in plans.values() for b in (plan.backend, plan.read_preference, plan.secondary)
                          if b is not None} - set(self._router.backends))
        if missing:
            raise FlagsRejected({"REDIS_URL": f"is required: the flags use backend(s) {', '.join(missing)}, "
                                              "which this relay has not configured"})
        in_memory = sorted(domain for domain, plan in plans.items()
                           if "memory" in (plan.backend, plan.read_preference))
        workers = self._settings.relay_workers
        if workers > 1 and in_memory:
            names = [n for n in blame if n.endswith(_MEMORY_FLAGS)] or list(blame) or ["RELAY_WORKERS"]
            message = (f"would keep or read {', '.join(in_memory)} in process memory, which needs RELAY_WORKERS=1 "
                       f"(this relay runs {workers} workers); use redis-read, rampdown or redis-primary")
            raise FlagsRejected({name: message for name in names})
        return plans

    def _overrides(self, source: str, raw_flags: Any, updated_at_ms: int,
                   version: Optional[int] = None) -> Overrides:
        parsed = parse_overrides(raw_flags)
        flags = {name: value for name, value in parsed.items() if value is not None}
        return Overrides(source, flags, updated_at_ms, self.validate(flags, flags), version)

    # -- reading the channels -------------------------------------------------------------------------
    def _fetch_redis(self) -> Union[Optional[str], StoreError]:
        assert self._redis is not None
        try:
            return self._redis.get(self._key)
        except StoreError as exc:
            return exc

    def _fetch_file(self) -> _FileRead:
        assert self._path is not None
        try:
            with open(self._path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                return _FileRead(handle.read(), stat.st_mtime_ns)
        except FileNotFoundError:
            return _FileRead()
        except OSError as exc:
            return _FileRead(error=f"{type(exc).__name__}: {exc.strerror or exc}")

    def _accept_redis(self, fetched: Union[Optional[str], StoreError], strict: bool) -> None:
        channel = self._channels[REDIS]
        if isinstance(fetched, StoreError):
            if channel.state != "unavailable":
                log.warning("store flags: Redis unavailable, keeping the overrides last read",
                            extra={"event": "store_flags_unavailable", "channel": REDIS,
                                   "error": type(fetched).__name__})
            channel.state, channel.error = "unavailable", type(fetched).__name__
            return
        if fetched == self._redis_seen:
            if channel.state == "unavailable":
                channel.state, channel.error = ("ok" if fetched else "empty"), None
            return
        self._redis_seen = fetched
        if fetched is None:
            if self._sets[REDIS] is not None:
                log.warning("store flags: the Redis overrides document is gone",
                            extra={"event": "store_flags_overrides_lost", "channel": REDIS, "key": self._key})
            self._sets[REDIS] = None
            channel.state, channel.error = "empty", None
            return
        try:
            doc = json.loads(fetched)
            if not (isinstance(doc, dict) and isinstance(doc.get("version"), int)
                    and isinstance(doc.get("flags"), dict)):
                raise ValueError("not an overrides document ({version, flags, updatedAt})")
            updated = parse_iso_ms(str(doc["updatedAt"]))
            self._sets[REDIS] = self._overrides(REDIS, doc.get("flags"), updated, doc["version"])
        except FlagsRejected as exc:
            self._reject(REDIS, f"Redis key {self._key}", exc.details, strict)
        except (ValueError, KeyError, TypeError) as exc:
            self._reject(REDIS, f"Redis key {self._key}", {"document": str(exc) or type(exc).__name__}, strict)
        else:
            channel.state, channel.error = "ok", None

    def _accept_file(self, read: _FileRead, strict: bool) -> None:
        channel = self._channels[FILE]
        if read.signature == self._file_seen:
            return
        self._file_seen = read.signature
        if read.error is not None:
            if strict:
                raise ConfigError(f"invalid configuration:\n  STORE_FLAGS_FILE: {self._path} cannot be read "
                                  f"({read.error})")
            log.error("store flags: the flags file cannot be read, keeping the overrides last read",
                      extra={"event": "store_flags_file_unreadable", "channel": FILE, "path": self._path,
                             "error": read.error})
            channel.state, channel.error = "unreadable", read.error
            return
        if read.content is None:
            if self._sets[FILE] is not None:
                log.warning("store flags: the flags file is gone",
                            extra={"event": "store_flags_file_missing", "channel": FILE, "path": self._path})
            self._sets[FILE] = None
            channel.state, channel.error = "missing", None
            return
        try:
            text = read.content.decode("utf-8")
            raw = json.loads(text) if text.strip() else {}
            self._sets[FILE] = self._overrides(FILE, raw, read.mtime_ns // 1_000_000)
        except FlagsRejected as exc:
            self._reject(FILE, f"STORE_FLAGS_FILE {self._path}", exc.details, strict)
        except ValueError as exc:
            self._reject(FILE, f"STORE_FLAGS_FILE {self._path}", {"json": str(exc)}, strict)
        else:
            channel.state, channel.error = "ok", None

    def _reject(self, channel: str, where: str, details: Mapping[str, str], strict: bool) -> None:
        """Overrides that cannot run: stop startup, or keep the last good ones at runtime."""
        if strict:
            lines = "\n  ".join(f"{name}: {text}" for name, text in sorted(details.items()))
            raise ConfigError(f"invalid store flag overrides in {where}:\n  {lines}")
        log.error("store flags: overrides refused, keeping the last good ones",
                  extra={"event": "store_flags_rejected", "channel": channel, "details": dict(details)})
        self._channels[channel].state = "invalid"
        self._channels[channel].error = "; ".join(f"{k}: {v}" for k, v in sorted(details.items()))

    # -- applying -----------------------------------------------------------------------------------
    def _newest(self) -> Optional[Overrides]:
        present = [s for s in self._sets.values() if s is not None]
        return max(present, key=Overrides.order) if present else None

    def _apply(self) -> dict[str, tuple[DomainPlan, DomainPlan]]:
        """Make the newest overrides the ones in force; log and report the domains that changed."""
        chosen = self._newest()
        self._in_force = chosen
        plans = dict(chosen.plans) if chosen is not None else dict(self._settings.plans)
        old = dict(self._router.plans)
        if plans == old:
            return {}
        changed = self._router.apply_plans(plans)
        self.changes += len(changed)
        source = chosen.source if chosen is not None else "environment"
        for domain, (before, after) in changed.items():
            log.warning("store flags changed", extra={
                "event": "store_flags_changed", "domain": domain, "source": source,
                "version": chosen.version if chosen is not None else None,
                "old": before.as_flags(), "new": after.as_flags()})
        if self._on_change is not None:
            try:
                self._on_change(old, plans)
            except Exception as exc:
                log.error("store flags change listener failed",
                          extra={"event": "store_flags_listener_failed", "error": type(exc).__name__})
        return changed

    # -- startup, polling, PUT ----------------------------------------------------------------------
    def load(self) -> dict[str, tuple[DomainPlan, DomainPlan]]:
        """Read the persisted overrides and apply them; before serving.

        Overrides that cannot run stop startup with ``ConfigError`` naming them. Redis being
        unreachable does not: the poller applies its overrides once it answers.
        """
        with self._lock:
            if self._redis is not None:
                self._accept_redis(self._fetch_redis(), strict=True)
            if self._path is not None:
                self._accept_file(self._fetch_file(), strict=True)
            return self._apply()

    def poll(self) -> dict[str, tuple[DomainPlan, DomainPlan]]:
        """Read both channels once and apply what changed (the poller calls this every second)."""
        with self._lock:
            generation = self._generation
        fetched_redis = self._fetch_redis() if self._redis is not None else None
        fetched_file = self._fetch_file() if self._path is not None else None
        with self._lock:
            if generation != self._generation:
                return {}
            if self._redis is not None:
                self._accept_redis(fetched_redis, strict=False)
            if fetched_file is not None:
                self._accept_file(fetched_file, strict=False)
            return self._apply()

    def update(self, changes: Any) -> UpdateResult:
        """Merge ``changes`` (a JSON object; null removes an override) into the overrides in force.

        Validated as a whole before anything is written or applied (``FlagsRejected``); then
        written to Redis (compare-and-set, so concurrent PUTs both land) and to the flags file,
        and applied here. Other processes apply it within a poll interval.
        """
        requested = parse_overrides(changes)
        with self._lock:
            self._generation += 1
            if self._path is not None:
                self._accept_file(self._fetch_file(), strict=False)
            draft, redis_state = self._put_redis(requested)
            if redis_state != WRITTEN:
                draft = replace(draft, version=None)
            file_state = NOT_CONFIGURED
            if self._path is not None:
                file_state = WRITTEN if self._write_file(draft.flags, draft.updated_at_ms) else FAILED
                if file_state == WRITTEN:
                    self._sets[FILE] = replace(draft, source=FILE, version=None)
            channels = {REDIS: redis_state, FILE: file_state}
            self._sets[LOCAL] = None if WRITTEN in channels.values() else draft
            result = UpdateResult(draft.flags, draft.version, draft.updated_at_ms, channels, self._apply())
        log.warning("store flags updated", extra={
            "event": "store_flags_updated", "requested": dict(requested), "persisted": result.persisted,
            "channels": channels, "version": draft.version})
        return result

    def _merge(self, requested: Mapping[str, Optional[str]], version: Optional[int] = None) -> Overrides:
        """The overrides in force with ``requested`` applied, validated, dated later than any seen."""
        base = self._newest()
        merged = dict(base.flags) if base is not None else {}
        for name, value in requested.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        plans = self.validate(merged, list(requested))
        latest = max((s.updated_at_ms for s in self._sets.values() if s is not None), default=0)
        return Overrides(LOCAL, merged, max(self._clock_ms(), latest + 1), plans, version)

    def _put_redis(self, requested: Mapping[str, Optional[str]]) -> tuple[Overrides, str]:
        """Merge ``requested`` and write it with compare-and-set, merging again when another
        process wrote first; return the merged overrides and the Redis channel's outcome."""
        if self._redis is None:
            return self._merge(requested), NOT_CONFIGURED
        for _attempt in range(_CAS_ATTEMPTS):
            current = self._fetch_redis()
            self._accept_redis(current, strict=False)
            if isinstance(current, StoreError):
                return self._merge(requested), FAILED
            draft = self._merge(requested, _document_version(current) + 1)
            if self._write_redis(current, draft):
                self._sets[REDIS] = replace(draft, source=REDIS)
                return draft, WRITTEN
            if self._channels[REDIS].state == "unavailable":
                return draft, FAILED
        return draft, FAILED

    def _write_redis(self, expected: Optional[str], draft: Overrides) -> bool:
        assert self._redis is not None
        doc = json.dumps({"version": draft.version, "flags": dict(sorted(draft.flags.items())),
                          "updatedAt": iso_ms(draft.updated_at_ms)}, separators=(",", ":"))
        try:
            written = self._redis.compare_and_set(self._key, expected, doc)
        except StoreError as exc:
            self._accept_redis(exc, strict=False)
            return False
        if written:
            self._redis_seen = doc
            self._channels[REDIS] = _ChannelState("ok")
        return written

    def _write_file(self, flags: Mapping[str, str], stamp: int) -> bool:
        """Replace the flags file atomically (temporary file, then rename), dated ``stamp``."""
        assert self._path is not None
        content = (json.dumps(dict(sorted(flags.items())), indent=2) + "\n").encode("utf-8")
        directory = os.path.dirname(os.path.abspath(self._path))
        stamp_ns = stamp * 1_000_000
        tmp_name = None
        try:
            with tempfile.NamedTemporaryFile("wb", dir=directory, prefix=".flags-", suffix=".tmp",
                                             delete=False) as tmp:
                tmp_name = tmp.name
                tmp.write(content)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.chmod(tmp_name, 0o644)
            os.utime(tmp_name, ns=(stamp_ns, stamp_ns))
            os.replace(tmp_name, self._path)
        except OSError as exc:
            if tmp_name is not None and os.path.exists(tmp_name):
                os.unlink(tmp_name)
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            log.error("store flags: the flags file cannot be written",
                      extra={"event": "store_flags_file_unwritable", "path": self._path, "error": error})
            self._channels[FILE] = _ChannelState("unwritable", error)
            return False
        self._file_seen = _FileRead(content, stamp_ns).signature
        self._channels[FILE] = _ChannelState("ok")
        return True

    # -- the poller ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Poll Redis and the flags file every ``interval_s`` in a daemon thread (when either is set)."""
        if self._thread is not None or (self._redis is None and self._path is None):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="store-flags-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:
                log.error("store flags poll failed", extra={"event": "store_flags_poll_failed",
                                                            "error": type(exc).__name__})

    # -- reading ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The flags part of ``GET /ops/store``."""
        with self._lock:
            chosen = self._in_force
            names = set(flag_names())
            redis_set, file_set = self._sets[REDIS], self._sets[FILE]
            return {
                "source": chosen.source if chosen is not None else "environment",
                "overrides": dict(chosen.flags) if chosen is not None else {},
                "version": chosen.version if chosen is not None else None,
                "updatedAt": iso_ms(chosen.updated_at_ms) if chosen is not None else None,
                "environment": {k: v for k, v in sorted(self._settings.flag_env.items()) if k in names},
                "changes": self.changes,
                "pollIntervalS": self.interval_s,
                "channels": {
                    REDIS: {"configured": self._redis is not None, "key": self._key,
                            "state": self._channels[REDIS].state if self._redis is not None else NOT_CONFIGURED,
                            "error": self._channels[REDIS].error,
                            "version": redis_set.version if redis_set is not None else None,
                            "updatedAt": iso_ms(redis_set.updated_at_ms) if redis_set is not None else None},
                    FILE: {"configured": self._path is not None, "path": self._path,
                           "state": self._channels[FILE].state if self._path is not None else NOT_CONFIGURED,
                           "error": self._channels[FILE].error,
                           "updatedAt": iso_ms(file_set.updated_at_ms) if file_set is not None else None},
                },
            }
