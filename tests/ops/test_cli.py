"""``python -m relay.cli`` against a live relay in Redis mode: every subcommand, text and ``--json``."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.phases import DOMAINS, PRESETS
from relay.cli import CliError, evaluate_domain, load_gates, targets_for
from tests.ops.conftest import KEY_PREFIX, OpsRelay, start_ops_relay
from tests.support.redisproc import RedisServer

#: Targets a healthy test relay meets. Mismatches are not held to a rate: within one callback the audit
#: record is read, then compare-and-set, and the shadow read of the old value meets the new one in Redis.
PERMISSIVE = {"defaults": {"breakerClosed": True, "minOperations": 1, "maxErrorRate": 0.05, "maxTimeoutRate": 0.05,
                           "maxP95Ms": 250, "maxP99Ms": 500, "minPhaseAgeSeconds": 0},
              "phases": {"shadow": {"minComparisons": 0, "maxMismatchRate": 1.0}}}
STRICT = {"defaults": PERMISSIVE["defaults"], "phases": {"shadow": {"minComparisons": 1_000_000}}}


@pytest.fixture(scope="module")
def ops(redis_session: RedisServer) -> Iterator[OpsRelay]:
    with start_ops_relay(redis_session, phase="shadow") as relay:
        relay.traffic(20)
        yield relay


@pytest.fixture
def shadow(ops: OpsRelay) -> OpsRelay:
    """The relay with no runtime override: every domain in ``shadow``, as started."""
    ops.reset_flags()
    return ops


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def redis_audit_key(command_id: str) -> str:
    return f"{KEY_PREFIX}:{{audit}}:{command_id}"


# -- status and flags --------------------------------------------------------------------------------
def test_status_lists_every_domain_with_its_phase_and_figures(shadow: OpsRelay) -> None:
    text = shadow.cli("status")
    data = shadow.cli("--json", "status")

    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "breaker closed" in lines[0]
    for domain in DOMAINS:
        assert any(line.split()[:2] == [domain, "shadow"] for line in lines), domain
    assert data.returncode == 0, data.stderr
    status = json.loads(data.stdout)
    assert status["breaker"] == "closed"
    assert {d: e["flags"]["phase"] for d, e in status["domains"].items()} == dict.fromkeys(DOMAINS, "shadow")
    audit = status["domains"]["audit"]["metrics"]
    assert audit["operations"] > 0
    assert audit["p95Ms"] is not None and audit["p99Ms"] >= audit["p50Ms"]
    assert audit["errorRate"] == 0


def test_flags_set_changes_a_domain_and_confirms_what_changed(shadow: OpsRelay) -> None:
    result = shadow.cli("flags", "set", "--domain", "audit", "PHASE=redis-read")

    assert result.returncode == 0, result.stderr
    assert "1 domain(s) changed" in result.stdout
    assert "audit: phase shadow -> redis-read" in result.stdout
    assert "overrides in force: STORE_AUDIT_PHASE=redis-read" in result.stdout
    assert "persisted: yes" in result.stdout
    assert shadow.phases()["audit"] == "redis-read"
    assert shadow.phases()["inflight"] == "shadow"

    undone = shadow.cli("--json", "flags", "unset", "--domain", "audit", "PHASE")

    assert undone.returncode == 0, undone.stderr
    change = json.loads(undone.stdout)
    assert change["changed"]["audit"]["new"]["phase"] == "shadow"
    assert change["overrides"] == {}
    assert shadow.phases()["audit"] == "shadow"


def test_flags_show_reports_the_overrides_and_their_source(shadow: OpsRelay) -> None:
    shadow.put_flags({"STORE_LOCALE_PHASE": "redis-read"})

    text = shadow.cli("flags", "show")
    data = json.loads(shadow.cli("--json", "flags", "show").stdout)

    assert text.returncode == 0, text.stderr
    assert "overrides: STORE_LOCALE_PHASE=redis-read" in text.stdout
    assert "environment: STORE_PHASE=shadow" in text.stdout
    assert data["flags"]["source"] == "redis"
    assert data["domains"]["locale"]["phase"] == "redis-read"


def test_a_refused_flag_change_exits_1_and_changes_nothing(shadow: OpsRelay) -> None:
    result = shadow.cli("flags", "set", "STORE_AUDIT_SHADOW_SAMPLE_RATE=2")

    assert result.returncode == 1
    assert "refused" in result.stdout
    assert "STORE_AUDIT_SHADOW_SAMPLE_RATE: accepts a number from 0 to 1" in result.stdout
    assert shadow.get("/ops/store")["flags"]["overrides"] == {}


def test_an_unknown_flag_name_is_a_usage_error(shadow: OpsRelay) -> None:
    result = shadow.cli("flags", "set", "--domain", "audit", "COLOUR=blue")

    assert result.returncode == 2
    assert "COLOUR: not a store flag" in result.stderr


# -- gates -------------------------------------------------------------------------------------------
def test_gates_go_when_the_live_figures_meet_the_targets(shadow: OpsRelay, tmp_path: Path) -> None:
    shadow.traffic(10)
    config = write_json(tmp_path / "gates.json", PERMISSIVE)

    text = shadow.cli("gates", "--config", str(config), "--domain", "audit", "--domain", "idempotency")
    data = shadow.cli("--json", "gates", "--domain", "audit", env={"RELAY_GATES_FILE": str(config)})

    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.rstrip().splitlines()[-1].startswith("GO ")
    assert "passing: audit (next: redis-read), idempotency (next: redis-read)" in text.stdout
    assert data.returncode == 0
    report = json.loads(data.stdout)
    assert report["go"] is True
    checks = {c["name"]: c for c in report["domains"]["audit"]["checks"]}
    assert checks["comparisons"]["value"] >= 1 and checks["comparisons"]["ok"]
    assert checks["redis operations"]["value"] >= 1
    assert checks["redis p99Ms"]["ok"] and checks["breaker"]["value"] == "closed"


def test_gates_no_go_names_the_failing_check_and_exits_1(shadow: OpsRelay, tmp_path: Path) -> None:
    config = write_json(tmp_path / "gates.json", STRICT)

    text = shadow.cli("gates", "--config", str(config), "--domain", "audit")
    data = shadow.cli("--json", "gates", "--config", str(config), "--domain", "audit")

    assert text.returncode == 1
    assert text.stdout.rstrip().splitlines()[-1].startswith("NO-GO ")
    failing = [line for line in text.stdout.splitlines() if line.endswith("FAIL")]
    assert len(failing) == 1 and failing[0].split()[:3] == ["audit", "shadow", "comparisons"]
    assert data.returncode == 1
    assert json.loads(data.stdout)["go"] is False


def test_gates_refuse_a_custom_mix_of_flags(shadow: OpsRelay, tmp_path: Path) -> None:
    shadow.put_flags({"STORE_AUDIT_SHADOW_COMPARE": "false", "STORE_AUDIT_FALLBACK_TO_MEMORY": "true"})
    config = write_json(tmp_path / "gates.json", PERMISSIVE)

    result = shadow.cli("--json", "gates", "--config", str(config), "--domain", "audit")

    assert result.returncode == 1
    gate = json.loads(result.stdout)["domains"]["audit"]
    assert gate["phase"] == "custom" and gate["checks"][0]["name"] == "phase"


def test_the_shipped_gates_file_is_valid_and_merges_domain_overrides() -> None:
    config = load_gates(Path(__file__).resolve().parents[2] / "config" / "gates.json")

    shadow_audit = targets_for(config, "shadow", "audit")
    shadow_ratelimit = targets_for(config, "shadow", "ratelimit")

    assert set(config["phases"]) == set(PRESETS)
    assert shadow_audit["minComparisons"] == 1000 and shadow_audit["maxMismatchRate"] == 0.001
    assert shadow_ratelimit["minComparisons"] is None and shadow_ratelimit["maxMismatchRate"] is None
    assert targets_for(config, "memory", "audit")["backend"] == "memory"


def test_a_gates_file_with_an_unknown_target_is_refused(tmp_path: Path) -> None:
    path = write_json(tmp_path / "gates.json", {"phases": {"shadow": {"maxMismatch": 0.1}}, "domains": {"nope": {}}})

    with pytest.raises(CliError) as refused:
        load_gates(path)

    assert "phases.shadow.maxMismatch: unknown target" in str(refused.value)
    assert "domains.nope: unknown domain" in str(refused.value)


def test_a_domain_without_enough_calls_is_no_go() -> None:
    entry = {"flags": PRESETS["shadow"].as_flags()}
    summary: dict[str, Any] = {"comparisons": 0, "mismatchRate": None, "backends": {}}
    config = {"defaults": {"backend": "redis", "minOperations": 100, "maxP99Ms": 25}}

    gate = evaluate_domain("machines", entry, summary, "closed", config, None, 0.0)

    assert gate["go"] is False
    assert [(c["name"], c["ok"]) for c in gate["checks"]] == [("redis operations", False), ("redis p99Ms", True)]


# -- reconcile and inventory -------------------------------------------------------------------------
def test_reconcile_reports_differences_and_repair_copies_from_the_authoritative_side(shadow: OpsRelay) -> None:
    ids = shadow.traffic(3)
    redis = shadow.redis.client()
    key = redis_audit_key(ids[0])
    record = json.loads(shadow.redis_value(key))
    record["data"]["status"] = "tampered"
    redis.set(key, json.dumps(record))
    redis.delete(redis_audit_key(ids[1]))

    found = shadow.cli("--progress", "reconcile", "audit")
    report = json.loads(shadow.cli("--json", "reconcile", "audit").stdout)
    repaired = shadow.cli("reconcile", "audit", "--repair")
    after = shadow.cli("--json", "reconcile", "audit")

    assert found.returncode == 1
    assert "compare: " in found.stderr and "100%" in found.stderr
    assert "missing 1  extra 0  different 1" in found.stdout
    assert report["authoritative"] == "memory" and report["other"] == "redis"
    assert sorted((d["outcome"], d["fields"]) for d in report["differences"]) == [
        ("different", ["data.status"]), ("missing", [])]
    assert all(d["key"].startswith("sha256:") and ids[0] not in d["key"] for d in report["differences"])
    assert repaired.returncode == 0, repaired.stdout
    assert "written 2" in repaired.stdout and "still differing: 0" in repaired.stdout
    assert json.loads(shadow.redis_value(key))["data"]["status"] != "tampered"
    assert after.returncode == 0
    assert json.loads(after.stdout)["different"] == 0 and json.loads(after.stdout)["missing"] == 0
    redis.close()


def test_reconcile_lists_at_most_limit_keys_and_leaves_extra_keys_alone(shadow: OpsRelay) -> None:
    redis = shadow.redis.client()
    template = shadow.redis_value(next(k for k in redis.scan_iter(f"{KEY_PREFIX}:{{templates}}:*") if "#" not in k))
    for n in range(3):
        redis.set(f"{KEY_PREFIX}:{{templates}}:extra-{n}", template)

    result = shadow.cli("--json", "reconcile", "templates", "--limit", "2", "--repair")

    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["extra"] == 3 and len(report["differences"]) == 2 and report["truncated"] is True
    assert report["repaired"]["skipped"] == 3 and report["remaining"] == 3
    assert redis.exists(f"{KEY_PREFIX}:{{templates}}:extra-0") == 1
    redis.delete(*(f"{KEY_PREFIX}:{{templates}}:extra-{n}" for n in range(3)))
    redis.close()


def test_inventory_counts_keys_per_domain_and_backend(shadow: OpsRelay) -> None:
    text = shadow.cli("inventory", "--sample", "5")
    data = shadow.cli("--json", "inventory")

    assert text.returncode == 0, text.stderr
    assert {line.split()[0] for line in text.stdout.splitlines()[1:] if not line.startswith("total")} == set(DOMAINS)
    inventory = json.loads(data.stdout)
    redis = shadow.redis.client()
    audit_keys = len(list(redis.scan_iter(f"{KEY_PREFIX}:{{audit}}:*")))
    redis.close()
    audit = inventory["domains"]["audit"]["backends"]
    assert audit["redis"]["keys"] == audit_keys
    assert audit["redis"]["records"] == audit_keys - 1
    assert audit["redis"]["method"] == "memory_usage" and audit["redis"]["bytes"] > 0
    assert audit["memory"]["method"] == "payload_length" and audit["memory"]["bytes"] > 0
    assert inventory["totals"]["redis"]["keys"] == sum(
        d["backends"]["redis"]["keys"] for d in inventory["domains"].values())


# -- errors ------------------------------------------------------------------------------------------
def test_a_wrong_token_or_an_unreachable_relay_exits_2(shadow: OpsRelay) -> None:
    unauthorized = shadow.cli("--token", "wrong", "status")
    unreachable = shadow.cli("--json", "--url", "http://127.0.0.1:9", "status")

    assert unauthorized.returncode == 2
    assert "HTTP 401 unauthorized_admin_request" in unauthorized.stderr
    assert unreachable.returncode == 2
    assert "cannot reach the relay" in json.loads(unreachable.stdout)["error"]
