"""The Prometheus alert rules: ``promtool check rules`` and their unit tests (``promtool test rules``)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
RULES = OPS / "alerts.yml"
RULE_TESTS = OPS / "alerts_test.yml"
#: What the issue asks alerts for, and the rule that covers it.
REQUIRED = {
    "timeouts": "RelayStoreRedisTimeouts",
    "error rate": "RelayStoreRedisErrorRate",
    "fallback rate": "RelayStoreFallbackRate",
    "mismatch rate": "RelayStoreShadowMismatchRate",
    "breaker open": "RelayStoreBreakerOpen",
    "key cardinality growth": "RelayStoreKeyCardinalityGrowth",
    "latency SLO breach": "RelayStoreLatencyP99",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `make promtool` installs Debian's prometheus package"
    return subprocess.run([binary, *args], cwd=OPS, capture_output=True, text=True, timeout=60)


def alerts() -> dict[str, str]:
    """Each alert's name and the text of its rule (the file has one ``- alert:`` entry per rule)."""
    parts = re.split(r"^\s*- alert: (\w+)\n", RULES.read_text(), flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2]))


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("concern", sorted(REQUIRED))
def test_each_required_alert_exists_and_points_at_the_runbook(concern: str) -> None:
    rule = alerts()[REQUIRED[concern]]
    severity = re.search(r"^\s+severity: (\w+)$", rule, re.M)
    runbook_link = re.search(r'^\s+runbook: "docs/runbook.md#([a-z-]+)"$', rule, re.M)
    runbook = (OPS.parents[1] / "docs" / "runbook.md").read_text()
    anchors = {line.lstrip("#").strip().lower().replace(" ", "-") for line in runbook.splitlines()
               if line.startswith("#")}

    assert severity is not None and severity.group(1) in ("page", "ticket")
    assert runbook_link is not None and runbook_link.group(1) in anchors, rule


def test_every_alert_is_unit_tested_firing() -> None:
    cases = re.split(r"^\s+- eval_time: ", RULE_TESTS.read_text(), flags=re.M)[1:]
    firing = [re.search(r"alertname: (\w+)", case) for case in cases if "exp_alerts: []" not in case]
    fired = {match.group(1) for match in firing if match is not None}

    assert fired == set(alerts())
