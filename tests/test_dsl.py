"""The @dev DSL and the callback's classification helpers against the reference's golden data:
every line of dsl_vectors.jsonl, the dsl.test.ts / router-task.test.ts / command-dedupe.test.ts
tables (§12) and the fingerprint vectors (§14)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from relay.dsl import (
    command_fingerprint,
    extract_ref,
    natural_language_task_prompt,
    parse_dev_command,
    should_apply_fingerprint_dedupe,
    wecom_kind,
)

VECTORS = Path(__file__).resolve().parent / "vectors" / "dsl_vectors.jsonl"
DSL_VECTORS = [json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines() if line.strip()]
UUID = "fc3949f3-c96f-4f3a-af61-94950652a9a8"


def test_vector_file_is_complete() -> None:
    assert len(DSL_VECTORS) == 78


@pytest.mark.parametrize("vector", DSL_VECTORS, ids=[f"{i}:{v['text']!r}" for i, v in enumerate(DSL_VECTORS)])
def test_golden_vector(vector: dict) -> None:
    parsed = parse_dev_command(vector["text"])
    assert parsed == vector["parsed"]
    assert natural_language_task_prompt(vector["text"]) == vector["taskPrompt"]
    assert wecom_kind(parsed) == vector["wecomKind"]


# -- packages/shared/test/dsl.test.ts ---------------------------------------------------------
@pytest.mark.parametrize("text", ["@dev help", "帮助", "命令列表", "你支持哪些命令？"])
def test_dsl_help(text: str) -> None:
    assert parse_dev_command(text) == {"kind": "help"}


@pytest.mark.parametrize("text", ["  @dev   status  ", "查看运行状态"])
def test_dsl_status(text: str) -> None:
    assert parse_dev_command(text) == {"kind": "status"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@dev plan split module", {"kind": "plan", "prompt": "split module"}),
        ("规划 核心模块重构方案", {"kind": "plan", "prompt": "核心模块重构方案"}),
        ("@dev patch fix login bug", {"kind": "patch", "prompt": "fix login bug"}),
        ("修复 README.md 的错别字", {"kind": "patch", "prompt": "修复 README.md 的错别字"}),
        (
            "请修改 README.md，在文件末尾追加一句：通过企业微信触发修改。",
            {"kind": "patch", "prompt": "请修改 README.md，在文件末尾追加一句：通过企业微信触发修改。"},
        ),
        ("@dev apply cmd-123", {"kind": "apply", "refId": "cmd-123"}),
        ("应用补丁 cmd-123", {"kind": "apply", "refId": "cmd-123"}),
        (f"执行补丁 {UUID}", {"kind": "apply", "refId": UUID}),
        ("@dev test pnpm -r test", {"kind": "test", "prompt": "pnpm -r test"}),
        ("运行测试 pnpm -r test", {"kind": "test", "prompt": "pnpm -r test"}),
        ("测试一下", {"kind": "test"}),
    ],
)
def test_dsl_commands(text: str, expected: dict) -> None:
    assert parse_dev_command(text) == expected


@pytest.mark.parametrize("text", ["hello", "@dev patch", "计划", "", "   ", "@dev"])
def test_dsl_null(text: str) -> None:
    assert parse_dev_command(text) is None


# -- router-task.test.ts: task prompt and kind -----------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@dev fix login flow", "fix login flow"),
        ("@dev: fix login flow", "fix login flow"),
        ("@dev：fix login flow", "fix login flow"),
        ("@dev   ", None),
        ("fix login flow", "fix login flow"),
        ("", None),
        ("  \ufeff ", None),
    ],
)
def test_task_prompt(text: str, expected: str | None) -> None:
    assert natural_language_task_prompt(text) == expected


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("help", "help"),
        ("status", "status"),
        ("plan", "task"),
        ("patch", "task"),
        ("apply", "task"),
        ("test", "task"),
        ("task", "task"),
    ],
)
def test_wecom_kind_collapses_everything_but_help_and_status(kind: str, expected: str) -> None:
    assert wecom_kind({"kind": kind}) == expected


def test_wecom_kind_of_unparsed_text_is_task() -> None:
    assert wecom_kind(None) == "task"


def test_task_envelope_can_carry_a_ref_id() -> None:
    parsed = parse_dev_command("apply cmd-123")
    assert wecom_kind(parsed) == "task"
    assert natural_language_task_prompt("apply cmd-123") == "apply cmd-123"
    assert parsed == {"kind": "apply", "refId": "cmd-123"}


# -- §5.6 quirks kept on purpose ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("please help me fix login", "help"),
        ("update the status bar color", "status"),
        ("test the help page", "test"),
        ("@devhelp", "help"),
        ("@DEV help", "help"),
        ("@dev，status", "status"),
    ],
)
def test_reference_quirks(text: str, kind: str) -> None:
    parsed = parse_dev_command(text)
    assert parsed is not None and parsed["kind"] == kind


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("please apply cmd-42 now", {"kind": "apply", "refId": "cmd-42"}),
        ("reapply cmd-1", None),
        ("合并补丁：cmd-77", None),
    ],
)
def test_apply_intent_needs_whitespace_around_the_term(text: str, expected: dict | None) -> None:
    assert parse_dev_command(text) == expected


# -- §5.7 JS regex semantics -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("看看help吧", {"kind": "help"}),
        ("查status了", {"kind": "status"}),
    ],
)
def test_cjk_characters_are_word_boundaries(text: str, expected: dict) -> None:
    assert parse_dev_command(text) == expected


def test_dev_prefix_is_followed_by_a_boundary_before_cjk() -> None:
    assert natural_language_task_prompt("@dev中文任务") == "中文任务"
    assert natural_language_task_prompt("@devtask") == "@devtask"


@pytest.mark.parametrize("terminator", ["\r", "\u2028", "\u2029"])
def test_test_payload_does_not_cross_js_line_terminators(terminator: str) -> None:
    assert parse_dev_command(f"请运行测试 a{terminator}b") is None
    assert parse_dev_command("请运行测试 a b") == {"kind": "test", "prompt": "a b"}


def test_bom_is_whitespace_like_in_js() -> None:
    assert parse_dev_command("\ufeff@dev\ufeffstatus\ufeff") == {"kind": "status"}
    assert parse_dev_command("plan\ufeffdo x") == {"kind": "plan", "prompt": "do x"}
    assert natural_language_task_prompt("\ufeff@dev\ufefffix it\ufeff") == "fix it"


@pytest.mark.parametrize("separator", ["\x85", "\x1c", "\x1f"])
def test_python_only_whitespace_is_not_whitespace(separator: str) -> None:
    assert parse_dev_command(f"plan{separator}do x") is None
    assert natural_language_task_prompt(f"{separator}hi{separator}") == f"{separator}hi{separator}"


@pytest.mark.parametrize("text", ["teſt", "\u212aey", "apply cmd-ſ"])
def test_case_folding_is_ascii_only(text: str) -> None:
    assert parse_dev_command(text) is None


# -- extractRef (§5.4) -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "allow_bare", "expected"),
    [
        (f"x {UUID.upper()} y", False, UUID.upper()),
        ("应用补丁 cmd-123", False, "cmd-123"),
        ("APPLY：cmd.1", False, "cmd.1"),
        ("apply ab", False, None),
        ("cmd-123", True, "cmd-123"),
        ("cmd-123", False, None),
        ("abc", True, None),
        ("a-", True, None),
        ("-ab", True, None),
        ("x:y:z", True, "x:y:z"),
        ("  ", True, None),
    ],
)
def test_extract_ref(text: str, allow_bare: bool, expected: str | None) -> None:
    assert extract_ref(text, allow_bare) == expected


# -- fingerprints (§4.6, §14, command-dedupe.test.ts) -----------------------------------------
def test_fingerprint_vector_patch() -> None:
    fingerprint = command_fingerprint(
        "WangGangWu", "dev-machine-1", "patch", prompt="  Patch   README.md  add one line  "
    )
    assert fingerprint == "cmdfp:17f33a4fc5a2912a1cc217784d050b0eb2a9eeca7830024f00a28dfaf273597f"
    preimage = "wanggangwu|dev-machine-1|patch||patch readme.md add one line"
    assert fingerprint == "cmdfp:" + hashlib.sha256(preimage.encode()).hexdigest()


def test_fingerprint_vector_apply() -> None:
    assert (
        command_fingerprint("u1", "m1", "apply", ref_id="cmd-123")
        == "cmdfp:3a826f29c400d5992eebc30fca5bd3658fe58bc5d412c17e902c2e3b43bc887e"
    )


def test_fingerprint_ignores_case_and_whitespace() -> None:
    assert command_fingerprint(
        "WangGangWu", "dev-machine-1", "patch", prompt="  Patch   README.md  add one line  "
    ) == command_fingerprint("wanggangwu", "DEV-machine-1", "patch", prompt="patch README.md add one line")


def test_fingerprint_differs_by_prompt() -> None:
    assert command_fingerprint("u1", "m1", "patch", prompt="add one line") != command_fingerprint(
        "u1", "m1", "patch", prompt="add two lines"
    )


def test_fingerprint_kind_is_not_normalised() -> None:
    assert command_fingerprint("u1", "m1", "patch") != command_fingerprint("u1", "m1", "PATCH")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("patch", True),
        ("apply", True),
        ("test", True),
        ("task", False),
        ("plan", False),
        ("status", False),
        ("help", False),
        (None, False),
    ],
)
def test_should_apply_fingerprint_dedupe(kind: str | None, expected: bool) -> None:
    assert should_apply_fingerprint_dedupe(kind) is expected
