"""Runtime store flags: validation, application, precedence, the flags file and Redis persistence."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from config.phases import PHASES, DomainPlan, flag_names
from config.settings import ConfigError, Settings, load_settings
from middleware.flags import FlagsRejected, RuntimeFlags, overrides_key
from middleware.routing import StoreRouter
from relay.app import DOMAINS
from relay.stores.envelope import iso_ms
from relay.stores.factory import build_backends
from relay.stores.keys import KeySpace
from tests.support.helpers import race
from tests.support.redisproc import RedisServer

#: Short Redis timeouts so a paused server fails fast.
FAST_REDIS = {"REDIS_SOCKET_TIMEOUT_MS": "100", "REDIS_CONNECT_TIMEOUT_MS": "100", "REDIS_OP_DEADLINE_MS": "300",
              "REDIS_MAX_RETRIES": "0", "REDIS_BREAKER_RESET_TIMEOUT_MS": "50"}


@dataclass
class Node:
    """One relay process's view: its settings, router and runtime flags."""

    settings: Settings
    router: StoreRouter
    flags: RuntimeFlags

    def phase(self, domain: str = "audit") -> Optional[str]:
        return self.router.plans[domain].phase

    def phases(self) -> set[Optional[str]]:
        return {plan.phase for plan in self.router.plans.values()}


NodeFactory = Callable[..., Node]


@pytest.fixture
def node() -> Iterator[NodeFactory]:
    made: list[Node] = []

    def make(env: Mapping[str, str], load: bool = True, **kwargs: Any) -> Node:
        settings = load_settings(env)
        router = StoreRouter(KeySpace(settings.store_app, settings.store_env), DOMAINS,
                             build_backends(settings), settings.plans)
        flags = RuntimeFlags(settings, router, interval_s=0.05, **kwargs)
        made.append(Node(settings, router, flags))
        if load:
            flags.load()
        return made[-1]

    yield make
    for made_node in made:
        made_node.flags.stop()
        made_node.router.close()


def redis_env(server: RedisServer, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": server.url, **FAST_REDIS, **extra}


def stored_document(server: RedisServer) -> Optional[dict[str, Any]]:
    client = server.client()
    try:
        raw = client.get("codexbridge:dev:flags:#overrides")
    finally:
        client.close()
    return None if raw is None else json.loads(raw)


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - started


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body, named", [
    ({"STORE_PHASE": "warp"}, "STORE_PHASE"),
    ({"STORE_AUDIT_SHADOW_SAMPLE_RATE": "2"}, "STORE_AUDIT_SHADOW_SAMPLE_RATE"),
    ({"STORE_LOCALE_DUAL_WRITE": "maybe"}, "STORE_LOCALE_DUAL_WRITE"),
    ({"STORE_PHASE": ["shadow"]}, "STORE_PHASE"),
    ({"STORE_NOPE": "1", "STORE_PHASE": "shadow"}, "STORE_NOPE"),
    (["STORE_PHASE"], "body"),
])
def test_a_bad_change_names_the_variable_and_changes_nothing(node: NodeFactory, redis_server: RedisServer,
                                                             tmp_path: Path, body: Any, named: str) -> None:
    flags_file = tmp_path / "flags.json"
    relay = node(redis_env(redis_server, STORE_FLAGS_FILE=str(flags_file)))
    relay.flags.update({"STORE_PHASE": "redis-read"})
    before = (dict(relay.router.plans), stored_document(redis_server), flags_file.read_bytes())

    with pytest.raises(FlagsRejected) as info:
        relay.flags.update(body)

    assert named in info.value.details
    assert info.value.as_dict()["error"] == "invalid_store_flags"
    assert (dict(relay.router.plans), stored_document(redis_server), flags_file.read_bytes()) == before


def test_unknown_names_are_refused_with_the_accepted_list(node: NodeFactory) -> None:
    relay = node({})
    with pytest.raises(FlagsRejected) as info:
        relay.flags.update({"STORE_AUDIT_PHASEE": "memory"})
    body = info.value.as_dict()
    assert body["details"] == {"STORE_AUDIT_PHASEE": "is not a store flag"}
    assert "STORE_AUDIT_PHASE" in body["accepted"] and "STORE_PHASE" in body["accepted"]


def test_redis_reads_without_redis_are_refused_naming_the_flags(node: NodeFactory) -> None:
    relay = node({})
    with pytest.raises(FlagsRejected) as info:
        relay.flags.update({"STORE_PHASE": "redis-read"})
    assert {"REDIS_URL", "STORE_PHASE"} <= set(info.value.details)
    assert relay.phases() == {"memory"}


def test_an_incoherent_mix_names_the_flags(node: NodeFactory, redis_server: RedisServer) -> None:
    relay = node(redis_env(redis_server, STORE_PHASE="shadow"))
    with pytest.raises(FlagsRejected) as info:
        relay.flags.update({"STORE_AUDIT_READ_PREFERENCE": "redis", "STORE_AUDIT_DUAL_WRITE": "false"})
    assert "STORE_AUDIT_READ_PREFERENCE" in info.value.details
    assert relay.phase() == "shadow"


def test_several_workers_refuse_memory_authority(node: NodeFactory, redis_server: RedisServer) -> None:
    relay = node(redis_env(redis_server, STORE_BACKEND="redis", RELAY_WORKERS="2"))
    with pytest.raises(FlagsRejected) as info:
        relay.flags.update({"STORE_LOCALE_PHASE": "shadow"})
    assert "RELAY_WORKERS=1" in info.value.details["STORE_LOCALE_PHASE"]
    assert relay.flags.update({"STORE_LOCALE_PHASE": "rampdown"}).changed.keys() == {"locale"}


# -- applying -----------------------------------------------------------------------------------
def test_a_change_without_redis_or_file_applies_here_only(node: NodeFactory) -> None:
    relay = node({})
    result = relay.flags.update({"STORE_SHADOW_SAMPLE_RATE": 0.25})
    assert result.persisted is False
    assert result.as_dict()["channels"] == {"redis": "not_configured", "file": "not_configured"}
    assert result.overrides == {"STORE_SHADOW_SAMPLE_RATE": "0.25"}
    assert set(result.changed) == set(DOMAINS)
    assert relay.router.plans["audit"].shadow_sample_rate == 0.25
    assert relay.flags.describe()["source"] == "local"


def test_null_removes_an_override_and_blank_hides_the_environment(node: NodeFactory,
                                                                  redis_server: RedisServer) -> None:
    relay = node(redis_env(redis_server, STORE_PHASE="shadow"))
    relay.flags.update({"STORE_PHASE": "redis-read", "STORE_AUDIT_PHASE": "rampdown"})
    assert (relay.phase("locale"), relay.phase("audit")) == ("redis-read", "rampdown")
    relay.flags.update({"STORE_PHASE": None})
    assert (relay.phase("locale"), relay.phase("audit")) == ("shadow", "rampdown")
    relay.flags.update({"STORE_PHASE": ""})
    assert relay.phase("locale") == "redis-primary"  # the legacy default: REDIS_URL alone selects Redis
    assert stored_document(redis_server)["flags"] == {"STORE_AUDIT_PHASE": "rampdown", "STORE_PHASE": ""}


def test_a_change_is_logged_with_old_and_new_and_reported(node: NodeFactory, redis_server: RedisServer) -> None:
    calls: list[tuple[dict[str, DomainPlan], dict[str, DomainPlan]]] = []
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("relay.store.flags")
    logger.addHandler(handler)
    try:
        relay = node(redis_env(redis_server, STORE_PHASE="redis-primary"),
                     on_change=lambda old, new: calls.append((dict(old), dict(new))))
        relay.flags.update({"STORE_INFLIGHT_PHASE": "redis-read"})
    finally:
        logger.removeHandler(handler)

    changed = [r for r in records if getattr(r, "event", None) == "store_flags_changed"]
    assert len(changed) == 1 and changed[0].levelno == logging.WARNING
    fields = vars(changed[0])
    assert fields["domain"] == "inflight"
    assert (fields["old"]["phase"], fields["new"]["phase"]) == ("redis-primary", "redis-read")
    assert len(calls) == 1
    assert calls[0][0]["inflight"].phase == "redis-primary" and calls[0][1]["inflight"].phase == "redis-read"
    assert relay.flags.describe()["changes"] == 1


# -- Redis: persistence and propagation -----------------------------------------------------------
def test_overrides_in_redis_survive_a_restart(node: NodeFactory, redis_server: RedisServer) -> None:
    first = node(redis_env(redis_server))
    result = first.flags.update({"STORE_PHASE": "redis-read"})
    assert result.persisted and result.version == 1

    doc = stored_document(redis_server)
    assert doc is not None and doc["version"] == 1 and doc["flags"] == {"STORE_PHASE": "redis-read"}
    assert doc["updatedAt"] == iso_ms(result.updated_at_ms)
    assert overrides_key(first.settings) == "codexbridge:dev:flags:#overrides"

    restarted = node(redis_env(redis_server))
    assert restarted.phases() == {"redis-read"}
    assert restarted.flags.describe()["source"] == "redis"


def test_the_poller_applies_a_change_made_by_another_instance(node: NodeFactory,
                                                              redis_server: RedisServer) -> None:
    watcher = node(redis_env(redis_server))
    other = node(redis_env(redis_server))
    watcher.flags.start()
    other.flags.update({"STORE_TEMPLATES_PHASE": "rampdown"})
    wait_for(lambda: watcher.phase("templates") == "rampdown", timeout_s=2.0)
    assert watcher.phase("audit") == "redis-primary"


def test_concurrent_changes_on_several_instances_are_all_kept(node: NodeFactory,
                                                               redis_server: RedisServer) -> None:
    domains = ["audit", "locale", "templates", "machines"]
    instances = [node(redis_env(redis_server)) for _ in domains]
    race(len(domains), lambda i: instances[i].flags.update({f"STORE_{domains[i].upper()}_PHASE": "rampdown"}))
    doc = stored_document(redis_server)
    assert doc is not None and doc["version"] == len(domains)
    assert doc["flags"] == {f"STORE_{d.upper()}_PHASE": "rampdown" for d in domains}


def test_an_invalid_document_stops_startup_and_is_ignored_at_runtime(node: NodeFactory,
                                                                      redis_server: RedisServer) -> None:
    running = node(redis_env(redis_server))
    running.flags.update({"STORE_PHASE": "redis-read"})
    bad = json.dumps({"version": 9, "flags": {"STORE_PHASE": "warp"}, "updatedAt": iso_ms(int(time.time() * 1000))})
    client = redis_server.client()
    client.set("codexbridge:dev:flags:#overrides", bad)
    client.close()

    running.flags.poll()
    assert running.phases() == {"redis-read"}
    assert running.flags.describe()["channels"]["redis"]["state"] == "invalid"
    with pytest.raises(ConfigError, match=r"flags:#overrides(.|\n)*STORE_PHASE"):
        node(redis_env(redis_server))


def test_a_deleted_document_returns_to_the_environment(node: NodeFactory, redis_server: RedisServer) -> None:
    relay = node(redis_env(redis_server, STORE_PHASE="redis-read"))
    relay.flags.update({"STORE_PHASE": "rampdown"})
    client = redis_server.client()
    client.delete("codexbridge:dev:flags:#overrides")
    client.close()
    relay.flags.poll()
    assert relay.phases() == {"redis-read"}


# -- the flags file -----------------------------------------------------------------------------
def test_the_flags_file_is_applied_at_startup_and_reloaded_when_it_changes(node: NodeFactory,
                                                                            tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    path.write_text(json.dumps({"STORE_SHADOW_SAMPLE_RATE": "0.25"}))
    relay = node({"STORE_FLAGS_FILE": str(path)})
    assert relay.router.plans["audit"].shadow_sample_rate == 0.25

    stat = path.stat()
    path.write_text(json.dumps({"STORE_SHADOW_SAMPLE_RATE": "0.75"}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: content decides
    relay.flags.poll()
    assert relay.router.plans["audit"].shadow_sample_rate == 0.75

    path.write_text(json.dumps({"STORE_SHADOW_SAMPLE_RATE": "7"}))
    relay.flags.poll()
    assert relay.router.plans["audit"].shadow_sample_rate == 0.75
    assert relay.flags.describe()["channels"]["file"]["state"] == "invalid"

    path.unlink()
    relay.flags.poll()
    assert relay.router.plans["audit"].shadow_sample_rate == 1.0


def test_the_poller_reloads_the_flags_file(node: NodeFactory, tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    relay = node({"STORE_FLAGS_FILE": str(path)})
    relay.flags.start()
    path.write_text(json.dumps({"STORE_AUDIT_SHADOW_SAMPLE_RATE": 0.5}))
    wait_for(lambda: relay.router.plans["audit"].shadow_sample_rate == 0.5, timeout_s=2.0)


@pytest.mark.parametrize("content, named", [
    ('{"STORE_PHASE": "warp"}', "STORE_PHASE"),
    ('{"STORE_PHAZE": "memory"}', "STORE_PHAZE"),
    ("{not json", "STORE_FLAGS_FILE"),
])
def test_an_invalid_flags_file_stops_startup(node: NodeFactory, tmp_path: Path, content: str, named: str) -> None:
    path = tmp_path / "flags.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        node({"STORE_FLAGS_FILE": str(path)})
    assert named in str(info.value) and str(path) in str(info.value)


def test_a_put_rewrites_the_flags_file_atomically_and_a_restart_keeps_it(node: NodeFactory,
                                                                         tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    relay = node({"STORE_FLAGS_FILE": str(path)})
    result = relay.flags.update({"STORE_AUDIT_SHADOW_SAMPLE_RATE": "0.5", "STORE_LOCALE_SHADOW_SAMPLE_RATE": 0.1})

    assert result.persisted and result.as_dict()["channels"] == {"redis": "not_configured", "file": "written"}
    assert json.loads(path.read_text()) == {"STORE_AUDIT_SHADOW_SAMPLE_RATE": "0.5",
                                            "STORE_LOCALE_SHADOW_SAMPLE_RATE": "0.1"}
    assert path.stat().st_mtime_ns == result.updated_at_ms * 1_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["flags.json"]

    restarted = node({"STORE_FLAGS_FILE": str(path)})
    assert restarted.router.plans["locale"].shadow_sample_rate == 0.1


def test_a_file_that_cannot_be_written_is_reported(node: NodeFactory, tmp_path: Path) -> None:
    relay = node({"STORE_FLAGS_FILE": str(tmp_path / "missing-dir" / "flags.json")})
    result = relay.flags.update({"STORE_SHADOW_SAMPLE_RATE": "0.5"})
    assert result.persisted is False and result.as_dict()["failed"] == ["file"]
    assert relay.router.plans["audit"].shadow_sample_rate == 0.5


# -- precedence ---------------------------------------------------------------------------------
def test_the_most_recent_of_file_and_redis_wins_over_the_environment(node: NodeFactory, redis_server: RedisServer,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    clock = {"now": 1_800_000_000_000}
    here = node(redis_env(redis_server, STORE_PHASE="redis-primary", STORE_FLAGS_FILE=str(path)),
                clock_ms=lambda: clock["now"])
    elsewhere = node(redis_env(redis_server, STORE_PHASE="redis-primary"), clock_ms=lambda: clock["now"])

    first = here.flags.update({"STORE_PHASE": "redis-read"})
    assert first.as_dict()["channels"] == {"redis": "written", "file": "written"}
    assert here.phases() == {"redis-read"}

    path.write_text(json.dumps({"STORE_PHASE": "rampdown"}))  # edited by hand, after the Redis document
    later_ns = (first.updated_at_ms + 1000) * 1_000_000
    os.utime(path, ns=(later_ns, later_ns))
    here.flags.poll()
    assert here.phases() == {"rampdown"} and here.flags.describe()["source"] == "file"

    clock["now"] = first.updated_at_ms + 2000  # a PUT on another instance, after the edit
    elsewhere.flags.update({"STORE_PHASE": "redis-read", "STORE_AUDIT_PHASE": "rampdown"})
    here.flags.poll()
    assert here.phase("locale") == "redis-read" and here.phase("audit") == "rampdown"
    assert here.flags.describe()["source"] == "redis"


def test_a_rollback_during_a_redis_outage_is_kept_when_redis_returns(node: NodeFactory, redis_server: RedisServer,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    env = redis_env(redis_server, STORE_FLAGS_FILE=str(path))
    relay = node(env)
    assert relay.flags.update({"STORE_PHASE": "redis-read"}).persisted

    redis_server.pause()
    try:
        rollback = relay.flags.update({"STORE_PHASE": "shadow"})
    finally:
        redis_server.resume()
    assert rollback.persisted is False and rollback.as_dict()["failed"] == ["redis"]
    assert relay.phases() == {"shadow"}
    assert stored_document(redis_server)["flags"] == {"STORE_PHASE": "redis-read"}

    wait_for(lambda: relay.flags.poll() == {} and relay.flags.describe()["channels"]["redis"]["state"] == "ok")
    assert relay.phases() == {"shadow"}
    assert node(env).phases() == {"shadow"}  # and a restart keeps it

    relay.flags.update({})  # re-sent once Redis answers: now in Redis too
    assert stored_document(redis_server)["flags"] == {"STORE_PHASE": "shadow"}


def test_every_flag_and_preset_is_documented() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("docs/migration.md", ".env.example"):
        text = (root / name).read_text()
        missing = [word for word in (*flag_names()[:7], *PHASES, *(d.upper() for d in DOMAINS), "STORE_FLAGS_FILE",
                                     "STORE_<DOMAIN>_<FLAG>") if word not in text]
        assert missing == [], f"{name} does not mention {missing}"
