"""Every command of ``docs/runbook.md`` runs, in the page's order, against a live relay and Redis.

Each fenced ``sh`` block is run with ``bash -euo pipefail`` from the project directory, with the
variables the runbook's conventions name; a ``<!-- given: VAR=value ... -->`` line before a block sets
those runtime flags (and no others) first. Each ``ini`` block is loaded as relay settings on top of its
given flags and must be accepted and change the plans.
"""
from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from config.settings import load_settings
from tests.ops.conftest import KEY_PREFIX, OpsRelay, start_ops_relay
from tests.support.live_relay import PROJECT_ROOT
from tests.support.redisproc import RedisServer

RUNBOOK = PROJECT_ROOT / "docs" / "runbook.md"
FENCE = re.compile(r"(?:<!-- given: (?P<given>[^>]*?) -->\n)?"
                   r"^(?P<indent>[ \t]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```$", re.S | re.M)
#: Targets a healthy test relay meets with little traffic: the shipped ones need minutes of production load.
TEST_GATES = {"defaults": {"breakerClosed": True, "minOperations": 0, "maxErrorRate": 0.05, "maxTimeoutRate": 0.05,
                           "maxP95Ms": 250, "maxP99Ms": 500, "minPhaseAgeSeconds": 0}}


@dataclass(frozen=True)
class Block:
    number: int
    lang: str
    given: dict[str, str]
    body: str

    @property
    def id(self) -> str:
        first = self.body.strip().splitlines()[0]
        return f"{self.number:02d}-{self.lang}-{re.sub(r'[^a-z0-9]+', '-', first.lower())[:40].strip('-')}"


def blocks() -> list[Block]:
    found = []
    for number, match in enumerate(FENCE.finditer(RUNBOOK.read_text()), 1):
        given = dict(item.split("=", 1) for item in (match["given"] or "").split())
        body = textwrap.dedent(match["body"]) if match["indent"] else match["body"]
        found.append(Block(number, match["lang"], given, body))
    return found


@pytest.fixture(scope="module")
def ops(redis_session: RedisServer) -> Iterator[OpsRelay]:
    with start_ops_relay(redis_session, phase="shadow") as relay:
        relay.traffic(10)
        yield relay


@pytest.fixture(scope="module")
def shell_env(ops: OpsRelay, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("runbook")
    gates = work / "gates.json"
    gates.write_text(json.dumps(TEST_GATES))
    return ops.cli_env(REDIS_URL=ops.redis.url, KEY_PREFIX=KEY_PREFIX, STORE_FLAGS_FILE=str(ops.flags_file),
                       RECORDS_DIR=str(work / "records"), RELAY_GATES_FILE=str(gates))


def test_the_runbook_has_only_runnable_blocks_and_uses_every_cli_command() -> None:
    found = blocks()
    commands = " ".join(b.body for b in found if b.lang == "sh")

    assert len(found) >= 20
    assert {b.lang for b in found} == {"sh", "ini"}
    for command in ("status", "flags show", "flags set", "flags unset", "gates", "reconcile", "inventory"):
        assert f"python -m relay.cli {command}" in commands or f"--json {command}" in commands, command
    assert not re.search(r"\b(FLUSHALL|FLUSHDB|flushall|flushdb)\b", commands)


@pytest.mark.parametrize("block", [b for b in blocks() if b.lang == "sh"], ids=lambda b: b.id)
def test_sh_block_runs(block: Block, ops: OpsRelay, shell_env: dict[str, str]) -> None:
    ops.reset_flags(**block.given)

    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.body], cwd=PROJECT_ROOT, env=shell_env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, f"{block.body}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@pytest.mark.parametrize("block", [b for b in blocks() if b.lang == "ini"], ids=lambda b: b.id)
def test_ini_block_is_valid_relay_configuration(block: Block, ops: OpsRelay) -> None:
    settings = [line.split("=", 1) for line in block.body.splitlines() if line.strip() and not line.startswith("#")]
    base = {"REDIS_URL": ops.redis.url, **block.given}

    before = load_settings(base)
    after = load_settings({**base, **dict(settings)})

    assert block.given, "an environment block needs the phase it applies to (<!-- given: ... -->)"
    assert after.plans != before.plans
