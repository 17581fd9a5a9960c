"""Message texts and helpers against format_vectors.jsonl (every ``fn`` in it), the router-task.test.ts
cases (§12) and the sanitiser, clip and locale vectors of §14."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.settings import DEFAULT_CALLBACK_PATH, callback_route_paths, normalize_callback_path
from relay.messages import (
    PushFailure,
    analyze_push_failure,
    clip_for_trace,
    format_fallback_result_message,
    format_result_message,
    handshake_text,
    infer_locale,
    js_trim,
    parse_form_urlencoded_body,
    passive_reply_text,
    resolve_machine_notify_user,
    sanitize_wecom_summary,
    utf16_len,
    utf16_slice,
)

VECTORS = Path(__file__).resolve().parent / "vectors" / "format_vectors.jsonl"
FORMAT_VECTORS = [json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines() if line.strip()]

# The file records no input for these two; they are the inputs of §14 and of router-task.test.ts
# (with a repeated key added, since the recorded output shows the last value winning).
CLIP_INPUT = ("a  b\n c " + "x" * 200, 20)
FORM_INPUT = "xml=%3Cxml%3Eok%3C%2Fxml%3E&nonce=1&a=c&a=d"


def _format(fn: Callable[..., str]) -> Callable[[dict], str]:
    def run(vector: dict) -> str:
        options = vector["options"]
        return fn(
            vector["status"],
            vector["summary"],
            command_id=options.get("commandId"),
            kind=options.get("kind"),
            machine_id=options.get("machineId"),
        )

    return run


def _callback_path(vector: dict) -> Any:
    assert callback_route_paths(vector["in"]) == vector["routes"]
    return normalize_callback_path(vector["in"])


RUNNERS: dict[str, Callable[[dict], Any]] = {
    "inferLocaleFromReplyText": lambda v: infer_locale(v["in"]),
    "sanitizeWeComSummary": lambda v: sanitize_wecom_summary(v["in"]),
    "formatWeComResultMessage": _format(format_result_message),
    "formatWeComFallbackResultMessage": _format(format_fallback_result_message),
    "buildCommandHandshakeMessage": lambda v: handshake_text(v["kind"], v["locale"]),
    "buildPassiveReplyContent": lambda v: passive_reply_text(v["status"], v["locale"]),
    "describeWeComPushFailure": lambda v: analyze_push_failure(v["in"]).to_dict(),
    "normalizeWeComCallbackPath": _callback_path,
    "clipForTrace": lambda v: clip_for_trace(*CLIP_INPUT),
    "parseFormUrlEncodedBody": lambda v: parse_form_urlencoded_body(FORM_INPUT),
}


def test_every_fn_in_the_vector_file_has_a_runner() -> None:
    assert len(FORMAT_VECTORS) == 78
    assert {vector["fn"] for vector in FORMAT_VECTORS} == set(RUNNERS)


@pytest.mark.parametrize("vector", FORMAT_VECTORS, ids=[f"{i}:{v['fn']}" for i, v in enumerate(FORMAT_VECTORS)])
def test_golden_vector(vector: dict) -> None:
    assert RUNNERS[vector["fn"]](vector) == vector["out"]


def test_form_body_keeps_first_insertion_order_and_last_value() -> None:
    parsed = parse_form_urlencoded_body(FORM_INPUT)
    assert list(parsed.items()) == [("xml", "<xml>ok</xml>"), ("nonce", "1"), ("a", "d")]


def test_form_body_decodes_plus_and_keeps_blank_values() -> None:
    assert parse_form_urlencoded_body("a=1+2&b=&c&&d=%E4%BD%A0") == {"a": "1 2", "b": "", "c": "", "d": "你"}


# -- router-task.test.ts ----------------------------------------------------------------------
def test_sanitizer_keeps_multi_line_summary() -> None:
    assert sanitize_wecom_summary("line1\nline2\nline3") == "line1\nline2\nline3"


def test_sanitizer_removes_diff_header_lines() -> None:
    summary = (
        "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n"
        "Patch generated.\nApply with local approval."
    )
    assert sanitize_wecom_summary(summary) == "Patch generated.\nApply with local approval."


def test_sanitizer_removes_ansi_codes_and_bel() -> None:
    summary = "Build failed:\x1b[31m ERR \x1b[0mline\x07\nnext step"
    assert sanitize_wecom_summary(summary) == "Build failed: ERR line\nnext step"


def test_help_handshake_in_zh_is_not_english() -> None:
    assert "Command help" not in handshake_text("help", "zh-CN")


def test_task_handshake_in_en() -> None:
    assert "Command received and dispatched to local agent." in handshake_text("task", "en")


def test_handshake_locale_argument_wins_over_the_prompt_language() -> None:
    text = handshake_text("task", "zh-CN")
    assert "Command received and dispatched to local agent." not in text
    assert text.startswith("命令已接收")


def test_handshake_line_counts() -> None:
    assert len(handshake_text("status", "en").split("\n")) == 1
    assert len(handshake_text("task", "en").split("\n")) == 3
    assert handshake_text("test", "en").split("\n")[-1] == "Apply and run actions require explicit local approval."


def test_notify_user_single_binding_wins() -> None:
    assert resolve_machine_notify_user({"u1": "m1", "u2": "m2"}, "m1", ["u9"]) == "u1"


def test_notify_user_most_recent_bound_user() -> None:
    assert resolve_machine_notify_user({"u1": "m1", "u2": "m1"}, "m1", ["u2", "u1"]) == "u2"


def test_notify_user_recent_history_without_bindings() -> None:
    assert resolve_machine_notify_user({}, "m1", ["u9"]) == "u9"


def test_notify_user_skips_unbound_and_blank_users() -> None:
    bindings = {"u1": "m1", "u2": "m1"}
    assert resolve_machine_notify_user(bindings, "m1", [None, "  ", "u9", " u1 "]) == "u1"
    assert resolve_machine_notify_user(bindings, "m1", ["u9"]) == "u1"
    assert resolve_machine_notify_user({}, "m1", [None, ""]) is None


def test_callback_helpers() -> None:
    assert normalize_callback_path("wecom/callback/") == "/wecom/callback"
    assert normalize_callback_path("/custom/path//") == "/custom/path"
    assert callback_route_paths("/custom") == ["/custom", DEFAULT_CALLBACK_PATH]
    assert callback_route_paths("/wecom/callback") == [DEFAULT_CALLBACK_PATH]
    assert callback_route_paths(None) == [DEFAULT_CALLBACK_PATH]


def test_form_body_of_router_task_test() -> None:
    assert parse_form_urlencoded_body("xml=%3Cxml%3Eok%3C%2Fxml%3E&nonce=1") == {"xml": "<xml>ok</xml>", "nonce": "1"}


# -- §14 and §6.3.1 details -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ("a\r\nb\r\n\r\nc", "a\nb\nc"),
        ("\n".join(str(i) for i in range(1, 11)), "\n".join(str(i) for i in range(1, 9))),
        ("a" * 400, "a" * 317 + "..."),
        ("x\x9b31my", "xy"),
        ("\x1bXabc", "Xabc"),
        ("diff --git a b\n--- a\n+++ b\n@@ -1 +1 @@", "diff --git a b\n--- a\n+++ b\n@@ -1 +1 @@"),
        ("ok\x1b[31", "ok"),
        ("a\x00b\x7fc\x0bd", "a b c d"),
        ("a\x85b", "a\x85b"),
        ("\ufeff  \ufeff", "empty summary"),
        (None, "empty summary"),
        ("diff --gitx\nkeep", "diff --gitx\nkeep"),
    ],
)
def test_sanitizer(summary: str | None, expected: str) -> None:
    assert sanitize_wecom_summary(summary) == expected


def test_sanitizer_counts_utf16_units() -> None:
    result = sanitize_wecom_summary("😀" * 200)
    assert result == "😀" * 158 + "..."
    assert utf16_len(result) == 319


def test_clip_for_trace() -> None:
    assert clip_for_trace("a  b\n c " + "x" * 200, 20) == "a b c xxxxxxxxxxx..."
    assert clip_for_trace("  short\n text ", 20) == "short text"
    assert clip_for_trace(None, 20) == ""
    assert clip_for_trace("x" * 20, 20) == "x" * 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("补丁 generated ok", "en"),
        ("中文abc", "zh-CN"),
        ("命令 test pnpm", None),
        ("中文混合 with english words here", "en"),
        (None, None),
        ("\ufeff", None),
    ],
)
def test_infer_locale(text: str | None, expected: str | None) -> None:
    assert infer_locale(text) == expected


def test_utf16_helpers() -> None:
    assert utf16_len("a😀b") == 4
    assert utf16_len("\ud800x") == 2  # a lone surrogate is one code unit, as in JS
    assert utf16_slice("a😀b", 2) == "a"
    assert utf16_slice("a😀b", 3) == "a😀"
    assert utf16_slice("abc", 0) == ""
    assert utf16_slice("abc", 10) == "abc"


def test_js_trim_uses_the_js_whitespace_set() -> None:
    assert js_trim("\ufeff\u3000 a \u2028\xa0") == "a"
    assert js_trim("\x85a\x1c") == "\x85a\x1c"


# -- result messages (§6.3) -------------------------------------------------------------------
def test_result_message_patch_id_in_zh() -> None:
    assert format_result_message("ok", "patch generated by codex", command_id="c1", kind="patch") == (
        "[CodexBridge] status=ok\ntaskId=c1\nkind=patch\nsummary=patch generated by codex\npatchId=c1"
    )
    message = format_result_message("ok", "  patch generated by local fast append ", command_id="c1")
    assert message.endswith("\npatchId=c1")
    assert "patchId" not in format_result_message("ok", "patch generated by codex, mostly", command_id="c1")


def test_result_message_unknown_status_and_kind_stay_raw_in_zh() -> None:
    assert format_result_message("running", "进行中的任务", command_id="c1", kind="deploy") == (
        "[CodexBridge] 状态=running\n任务ID=c1\n类型=deploy\n摘要=进行中的任务"
    )


@pytest.mark.parametrize(
    "summary",
    [
        "waiting for local approval\nnext: later",
        "waiting for local approval\n  NEXT = later",
        "waiting for local approval, Open VS Code now",
        "等待本地审批，请打开 VS Code",
    ],
)
def test_no_next_step_when_the_summary_already_has_one(summary: str) -> None:
    assert "next=" not in format_result_message("ok", summary, command_id="c1")
    assert "下一步=" not in format_result_message("ok", summary, command_id="c1")


def test_waiting_approval_next_step_uses_the_machine() -> None:
    message = format_result_message("ok", "Waiting Local Approval for the change", kind="plan", machine_id="dev-1")
    assert message.endswith("\nnext=open VS Code and approve on dev-1")
    zh = format_result_message("ok", "补丁已生成，等待本地确认", kind="task")
    assert zh.endswith("\n下一步=在 本机 打开 VS Code 并完成本地审批")


def test_proposal_next_steps_only_for_tasks() -> None:
    assert "next=" not in format_result_message("ok", "Diff proposal ready: 2 files", kind="patch")
    assert format_result_message("ok", "Diff 方案已就绪，请查看", kind="task").endswith("\n下一步=打开 VS Code 审阅并应用该 Diff")


def test_fallback_message_labels_are_english_and_values_localized() -> None:
    assert format_fallback_result_message("rejected", "补丁被拒绝了", command_id="c1", kind="apply") == (
        "[CodexBridge] status=已拒绝\ntaskId=c1\nkind=应用补丁\nsummary=结果已生成，请在 VS Code 查看详情。"
    )


def test_message_without_command_id_or_kind() -> None:
    assert format_result_message("ok", "Patch generated successfully") == (
        "[CodexBridge] status=ok\nsummary=Patch generated successfully"
    )


# -- push failures (§6.6) ---------------------------------------------------------------------
def test_push_failure_other_code_with_ip() -> None:
    failure = analyze_push_failure("wecom send message failed: http=200 code=81013 msg=x, from ip: fe80::1")
    assert failure == PushFailure(
        code="81013", outbound_ip="fe80::1", detail="wecom push failed code=81013 outbound_ip=fe80::1"
    )


def test_push_failure_60020_without_ip() -> None:
    failure = analyze_push_failure("wecom send message failed: http=200 CODE=60020 msg=not allow")
    assert failure.detail == "wecom push failed code=60020 outbound_ip=unknown hint=allowlist_outbound_ip"
    assert failure.to_dict() == {
        "code": "60020",
        "hint": "add relay outbound ip to wecom app trusted ip list",
        "detail": failure.detail,
    }


def test_push_failure_code_must_be_word_bounded() -> None:
    assert analyze_push_failure("errcode=40001").to_dict() == {"detail": "errcode=40001"}


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_utf16_len_counts_each_astral_character_twice(text: str) -> None:
    assert utf16_len(text) == len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)
