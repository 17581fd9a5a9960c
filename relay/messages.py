"""User-facing texts and small pure helpers of the relay, byte-compatible with the reference.

Covers locale inference (§6.5), the WeCom summary sanitiser and result messages (§6.3), the
handshake and passive-reply texts (§4.8), push-failure analysis (§6.6), callback path helpers
(§2.10), the form-body parser (§1 step 14) and notify-user resolution (§6.1 step 6).

The reference is JavaScript, so lengths count UTF-16 code units and "whitespace" is the JS
``\\s``/``trim()`` set (which, unlike Python's, includes U+FEFF and excludes U+001C-U+001F and
U+0085). The helpers for both live here and are reused by ``relay.dsl`` and ``relay.wecom``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qsl

# ---------------------------------------------------------------------------------------------
# JavaScript string semantics

#: Characters matched by JS ``\s`` and removed by ``String.prototype.trim``.
JS_WHITESPACE = (
    "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
#: The body of a regex character class equal to JS ``\s`` (use as ``f"[{JS_WS_CLASS}]"``).
JS_WS_CLASS = (
    "\\t\\n\\x0b\\x0c\\r \\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
)
#: JS line terminators, the characters ``.`` does not match in JS.
JS_LINE_TERMINATORS = "\n\r\u2028\u2029"

_WS_RUN = re.compile(f"[{JS_WS_CLASS}]+")


def js_trim(text: str) -> str:
    """``String.prototype.trim``."""
    return text.strip(JS_WHITESPACE)


def collapse_whitespace(text: str) -> str:
    """``text.replace(/\\s+/g, " ")``."""
    return _WS_RUN.sub(" ", text)


def utf16_len(text: str) -> int:
    """``text.length`` in JS: astral characters count as two UTF-16 code units (a lone surrogate,
    which a Python string may hold, as one)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def utf16_slice(text: str, end: int) -> str:
    """``text.slice(0, end)`` counted in UTF-16 code units.

    Unlike JS, a cut that falls inside a surrogate pair drops the whole character instead of
    leaving a lone surrogate (which would become U+FFFD or invalid UTF-8 on the wire).
    """
    if end <= 0:
        return ""
    units = 0
    for index, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > end:
            return text[:index]
    return text


# ---------------------------------------------------------------------------------------------
# Locale (§6.5)

ZH_CN = "zh-CN"
EN = "en"

_CJK = re.compile("[\u3400-\u9fff]")
_ASCII_LETTER = re.compile("[A-Za-z]")


def infer_locale(text: Optional[str]) -> Optional[str]:
    """``zh-CN``, ``en`` or None (undecided) from the mix of CJK characters and ASCII letters."""
    trimmed = js_trim(text or "")
    if not trimmed:
        return None
    cjk = len(_CJK.findall(trimmed))
    letters = len(_ASCII_LETTER.findall(trimmed))
    if cjk >= 2 and cjk >= math.ceil(letters / 3):
        return ZH_CN
    if cjk > letters:
        return ZH_CN
    if letters >= 12 and cjk == 0:
        return EN
    if letters >= 6 and letters > 4 * cjk:
        return EN
    return None


def _is_zh(locale: Optional[str]) -> bool:
    return locale == ZH_CN


# ---------------------------------------------------------------------------------------------
# Summary sanitiser and trace clipping (§6.3.1)

EMPTY_SUMMARY = "empty summary"
_SUMMARY_MAX_LINES = 8
_SUMMARY_MAX_UNITS = 320
_ESC = "\x1b"
_C1_CSI = "\x9b"
_DIFF_HEADER = re.compile(f"^(?:diff --git\\b|(?:---|\\+\\+\\+|@@)[{JS_WS_CLASS}])", re.ASCII)


def _is_csi_final(ch: str) -> bool:
    return "\x40" <= ch <= "\x7e"


def _is_replaced_control(ch: str) -> bool:
    code = ord(ch)
    return code <= 0x08 or code in (0x0B, 0x0C) or 0x0E <= code <= 0x1F or code == 0x7F


def _strip_terminal_controls(text: str) -> str:
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if (ch == _ESC and i + 1 < n and text[i + 1] == "[") or ch == _C1_CSI:
            j = i + (2 if ch == _ESC else 1)
            while j < n and not _is_csi_final(text[j]):
                j += 1
            i = j + 1
            continue
        if ch == _ESC:
            i += 1
            continue
        out.append(" " if _is_replaced_control(ch) else ch)
        i += 1
    return "".join(out)


def sanitize_wecom_summary(summary: Optional[str]) -> str:
    """Make an agent summary fit a WeCom text message: no terminal codes, no diff headers,
    at most 8 non-empty lines and 320 UTF-16 units."""
    cleaned = js_trim(_strip_terminal_controls(summary or ""))
    if not cleaned:
        return EMPTY_SUMMARY
    lines = [js_trim(line) for line in cleaned.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if line]
    kept = [line for line in lines if not _DIFF_HEADER.search(line)] or lines
    result = "\n".join(collapse_whitespace(line) for line in kept[:_SUMMARY_MAX_LINES])
    if utf16_len(result) > _SUMMARY_MAX_UNITS:
        return utf16_slice(result, _SUMMARY_MAX_UNITS - 3) + "..."
    return result


def clip_for_trace(value: Optional[str], limit: int) -> str:
    """Collapse whitespace, trim, and cut to ``limit`` UTF-16 units ending in ``...``."""
    text = js_trim(collapse_whitespace(value or ""))
    if utf16_len(text) > limit:
        return utf16_slice(text, limit - 3) + "..."
    return text


# ---------------------------------------------------------------------------------------------
# Result messages (§6.3)

_STATUS_ZH = {"ok": "成功", "error": "失败", "rejected": "已拒绝", "cancelled": "已取消"}
_KIND_ZH = {
    "help": "帮助",
    "status": "状态",
    "plan": "计划",
    "patch": "补丁",
    "apply": "应用补丁",
    "test": "测试",
    "task": "任务",
}
_PATCH_SUMMARIES = frozenset(
    {
        "patch generated by codex",
        "patch generated by codex exec fallback",
        "patch generated by codex exec direct fallback",
        "patch generated by local fast append",
    }
)
_EXISTING_NEXT_LINE = re.compile(
    f"(?:^|(?<=[{JS_LINE_TERMINATORS}]))[{JS_WS_CLASS}]*(?:next|下一步)[{JS_WS_CLASS}]*[=:：]",
    re.ASCII | re.IGNORECASE,
)
_FALLBACK_SUMMARY = {ZH_CN: "结果已生成，请在 VS Code 查看详情。", EN: "result generated; open VS Code for details."}


def _localized_status(status: str, zh: bool) -> str:
    return _STATUS_ZH.get(status, status) if zh else status


def _localized_kind(kind: str, zh: bool) -> str:
    return _KIND_ZH.get(kind, kind) if zh else kind


def _next_step(summary: str, kind: Optional[str], machine_id: Optional[str], zh: bool) -> Optional[str]:
    lower = summary.lower()
    if _EXISTING_NEXT_LINE.search(summary) or "open vs code" in lower or "打开 VS Code" in summary:
        return None
    if (
        "waiting for local approval" in lower
        or "waiting local approval" in lower
        or "等待本地审批" in summary
        or "等待本地确认" in summary
    ):
        if zh:
            return f"在 {machine_id or '本机'} 打开 VS Code 并完成本地审批"
        return f"open VS Code and approve on {machine_id or 'local machine'}"
    if kind == "task" and ("diff proposal ready" in lower or "Diff 方案已就绪" in summary):
        return "打开 VS Code 审阅并应用该 Diff" if zh else "open VS Code and review/apply the diff"
    if kind == "task" and ("command proposal ready" in lower or "命令方案已就绪" in summary):
        return "打开 VS Code 并批准执行命令" if zh else "open VS Code and approve command execution"
    return None


def format_result_message(
    status: str,
    summary: Optional[str],
    *,
    command_id: Optional[str] = None,
    kind: Optional[str] = None,
    machine_id: Optional[str] = None,
) -> str:
    """The primary WeCom push text for an agent result, localized from the summary."""
    raw = summary or ""
    zh = (infer_locale(raw) or ZH_CN) == ZH_CN
    lines = [f"[CodexBridge] {'状态' if zh else 'status'}={_localized_status(status, zh)}"]
    if command_id:
        lines.append(f"{'任务ID' if zh else 'taskId'}={command_id}")
    if kind:
        lines.append(f"{'类型' if zh else 'kind'}={_localized_kind(kind, zh)}")
    sanitized = sanitize_wecom_summary(raw)
    if zh and sanitized == EMPTY_SUMMARY:
        sanitized = "无摘要"
    label = "摘要" if zh else "summary"
    if "\n" in sanitized:
        lines.append(f"{label}:")
        lines.extend(sanitized.split("\n"))
    else:
        lines.append(f"{label}={sanitized}")
    step = _next_step(raw, kind, machine_id, zh)
    if step:
        lines.append(f"{'下一步' if zh else 'next'}={step}")
    if command_id and js_trim(raw) in _PATCH_SUMMARIES:
        lines.append(f"{'补丁ID' if zh else 'patchId'}={command_id}")
    return "\n".join(lines)


def format_fallback_result_message(
    status: str,
    summary: Optional[str],
    *,
    command_id: Optional[str] = None,
    kind: Optional[str] = None,
    machine_id: Optional[str] = None,
) -> str:
    """The shorter text sent when the primary push fails: English labels, localized values,
    a fixed "open VS Code" summary and no patchId line."""
    raw = summary or ""
    locale = infer_locale(raw) or ZH_CN
    zh = locale == ZH_CN
    lines = [f"[CodexBridge] status={_localized_status(status, zh)}"]
    if command_id:
        lines.append(f"taskId={command_id}")
    if kind:
        lines.append(f"kind={_localized_kind(kind, zh)}")
    lines.append(f"summary={_FALLBACK_SUMMARY[locale]}")
    step = _next_step(raw, kind, machine_id, zh)
    if step:
        lines.append(f"next={step}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Handshake and passive replies (§4.8)

_HELP_ZH = "\n".join(
    [
        "命令帮助",
        "",
        "1. help / 帮助 - 查看帮助",
        "2. status / 状态 - 查看状态",
        "3. patch <需求> - 生成补丁",
        "4. apply <补丁ID> - 应用补丁",
        "5. test [命令] - 运行测试",
        "",
        "说明: 支持不带 @dev 的自然语言指令",
    ]
)
_HELP_EN = "\n".join(
    [
        "Command help",
        "",
        "1. help / assist - show help",
        "2. status / state - show status",
        "3. patch <request> - generate patch",
        "4. apply <patchId> - apply patch",
        "5. test [command] - run tests",
        "",
        "Note: natural-language commands without @dev are supported",
    ]
)


def handshake_text(kind: str, locale: Optional[str]) -> str:
    """The ``passiveMessage`` of a dispatched command; English unless the locale is zh-CN."""
    zh = _is_zh(locale)
    if kind == "help":
        return _HELP_ZH if zh else _HELP_EN
    lines = ["命令已接收，已分发到本地代理。" if zh else "Command received and dispatched to local agent."]
    if kind == "task":
        lines.append("自然语言任务路由已启用。" if zh else "Natural-language task routing is active.")
    if kind in ("apply", "test", "task"):
        lines.append(
            "Apply 和 Run 操作需要本地明确审批。" if zh else "Apply and run actions require explicit local approval."
        )
    return "\n".join(lines)


_PASSIVE_REPLY = {
    "sent_to_agent": ("命令已接收，正在排队处理。", "Command received and queued."),
    "machine_offline": ("命令未执行：目标机器离线。", "Command not executed: target machine is offline."),
    "duplicate_ignored": ("重复消息已忽略。", "Duplicate message ignored."),
    "ignored_non_dev_message": ("消息已接收。", "Message received."),
}
_PASSIVE_REPLY_OTHER = ("请求已接收。", "Request received.")


def passive_reply_text(status: str, locale: Optional[str]) -> str:
    """The fixed passive-reply line for an ack status when there is no passiveMessage."""
    zh_text, en_text = _PASSIVE_REPLY.get(status, _PASSIVE_REPLY_OTHER)
    return zh_text if _is_zh(locale) else en_text


# ---------------------------------------------------------------------------------------------
# Push failure analysis (§6.6)

_CODE = re.compile(r"\bcode=(\d+)", re.ASCII | re.IGNORECASE)
_FROM_IP = re.compile(f"from ip:[{JS_WS_CLASS}]*([0-9a-f:.]+)", re.ASCII | re.IGNORECASE)
IP_ALLOWLIST_CODE = "60020"


@dataclass(frozen=True)
class PushFailure:
    """What a failed WeCom push error message says, for audit metadata and logs."""

    detail: str
    code: Optional[str] = None
    outbound_ip: Optional[str] = None
    hint: Optional[str] = None

    def to_dict(self) -> dict[str, str]:
        """The reference's shape: ``{code?, outboundIp?, hint?, detail}``."""
        fields = {"code": self.code, "outboundIp": self.outbound_ip, "hint": self.hint, "detail": self.detail}
        return {key: value for key, value in fields.items() if value is not None}


def analyze_push_failure(message: str) -> PushFailure:
    """Pull the WeCom error code and the relay's outbound IP out of a push error message."""
    code_match = _CODE.search(message)
    ip_match = _FROM_IP.search(message)
    code = code_match.group(1) if code_match else None
    ip = ip_match.group(1) if ip_match else None
    if code == IP_ALLOWLIST_CODE:
        return PushFailure(
            code=code,
            outbound_ip=ip,
            hint="add relay outbound ip to wecom app trusted ip list",
            detail=f"wecom push failed code={code} outbound_ip={ip or 'unknown'} hint=allowlist_outbound_ip",
        )
    if code:
        suffix = f" outbound_ip={ip}" if ip else ""
        return PushFailure(code=code, outbound_ip=ip, detail=f"wecom push failed code={code}{suffix}")
    return PushFailure(outbound_ip=ip, detail=message)


# ---------------------------------------------------------------------------------------------
# Form bodies (§1)

def parse_form_urlencoded_body(body: str) -> dict[str, str]:
    """A flat dict from an ``application/x-www-form-urlencoded`` body; the last repeat wins.

    Note that Werkzeug's ``MultiDict.to_dict()`` keeps the *first* value instead.
    """
    return dict(parse_qsl(body, keep_blank_values=True))


# ---------------------------------------------------------------------------------------------
# Result notification target (§6.1 step 6)


def resolve_machine_notify_user(
    bindings: Mapping[str, str],
    machine_id: str,
    recent_user_ids: Iterable[Optional[str]],
) -> Optional[str]:
    """Who to tell about a result nobody owns.

    ``bindings`` is userId -> machineId (MACHINE_BINDINGS order), ``recent_user_ids`` the userIds
    of the machine's recent audit records, newest first.
    """
    bound = [user for user, machine in bindings.items() if machine == machine_id]
    if len(bound) == 1:
        return bound[0]
    for user_id in recent_user_ids:
        candidate = js_trim(user_id or "")
        if candidate and (not bound or candidate in bound):
            return candidate
    return bound[0] if bound else None
