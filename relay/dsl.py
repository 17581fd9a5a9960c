"""The ``@dev`` command DSL (§5) and the classification helpers of the callback (§4.5, §4.6).

A port of the reference's ``parseDevCommand``; every quirk in §5.6 is kept on purpose (for example
any text mentioning "help" is a help command). Regexes follow the JS semantics of §5.7:
``re.ASCII`` for ``\\b`` and case-insensitive matching, the JS whitespace set instead of ``\\s``,
``\\Z`` instead of ``$``, and "not a JS line terminator" instead of ``.``.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional, TypedDict

from relay.messages import JS_LINE_TERMINATORS, JS_WS_CLASS, collapse_whitespace, js_trim


class ParsedCommand(TypedDict, total=False):
    """``{kind, prompt?, refId?}`` exactly as the reference returns it."""

    kind: str
    prompt: str
    refId: str


_WS = f"[{JS_WS_CLASS}]"
_NOT_WS = f"[^{JS_WS_CLASS}]"
_FLAGS = re.ASCII | re.IGNORECASE

DEV_PREFIX = "@dev"
KNOWN_KINDS = frozenset({"help", "status", "plan", "patch", "apply", "test", "task"})
FINGERPRINT_KINDS = frozenset({"patch", "apply", "test"})

_HELP_KEYWORDS = frozenset({"help", "帮助", "帮忙", "说明", "用法", "命令列表", "指令列表"})
_STATUS_KEYWORDS = frozenset({"status", "状态", "运行状态", "在线状态", "健康检查", "health"})
_TEST_TERMS = ("test", "测试", "跑测", "跑测试", "运行测试", "执行测试")
_PLAN_KEYWORDS = frozenset({"plan", "计划", "规划", "方案"})
_PATCH_KEYWORDS = frozenset({"patch", "补丁", "修改", "修复", "优化", "调整", "新增", "追加"})
_PATCH_PAYLOAD_ONLY = frozenset({"patch", "补丁"})
_APPLY_TERMS = ("apply", "应用", "应用补丁", "执行补丁", "合并补丁", "打补丁")

_KEYWORD_PUNCTUATION = ":：,，.。!！?？"

_HELP_PHRASES = ("帮助", "帮忙", "使用说明", "命令列表", "指令列表", "怎么用")
_COMMAND_WORDS = ("命令", "指令")
_COMMAND_QUESTION_WORDS = ("支持", "可用", "哪些", "什么", "列表")
_STATUS_PHRASES = ("状态", "运行状态", "在线状态", "健康检查")
_POLITE_PREFIXES = ("请", "麻烦", "请帮我", "帮我")
_PATCH_HINTS = ("修改", "修复", "新增", "追加", "删除", "重命名", "优化", "调整", "改成", "改为", "补充")
_TARGET_HINTS = ("文件", "代码", "README", "文档", "配置", "脚本")


def _alternation(terms: tuple[str, ...]) -> str:
    return "|".join(re.escape(term) for term in terms)


_WS_SPLIT = re.compile(f"{_WS}+")
_HELP_WORD = re.compile(r"\bhelp\b", re.ASCII)
_STATUS_WORD = re.compile(r"\b(?:status|health)\b", re.ASCII)
_APPLY_INTENT = re.compile(f"(?:^|{_WS})(?:{_alternation(_APPLY_TERMS)})(?:{_WS}|\\Z)", _FLAGS)
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", _FLAGS)
_APPLY_REF = re.compile(
    f"(?:{_alternation(_APPLY_TERMS)}){_WS}*[:：]?{_WS}*([a-z0-9][a-z0-9._:-]{{2,}})", _FLAGS
)
_BARE_REF = re.compile(r"(?=.*[-_:])[a-z0-9][a-z0-9._:-]{2,}\Z", _FLAGS | re.DOTALL)
_TEST_SHAPE = re.compile(
    f"(?:{_alternation(_POLITE_PREFIXES)})?{_WS}*"
    f"(?:运行|执行|跑|跑下|跑一下)?{_WS}*"
    f"(?:{_alternation(_TEST_TERMS)})"
    f"(?:{_WS}+([^{JS_LINE_TERMINATORS}]*))?\\Z",
    _FLAGS,
)
_TEST_SUFFIXES = ("一下", "下")
_FILE_LIKE = re.compile(r"[A-Za-z0-9_./-]+\.[A-Za-z0-9_+-]+", re.ASCII)
_PATCH_VERB_START = re.compile(
    f"(?:patch|补丁|{_alternation(_PATCH_HINTS)}){_WS}+{_NOT_WS}", _FLAGS
)
_TASK_PREFIX = re.compile(f"@dev\\b(?:{_WS}*[:：]{_WS}*|{_WS}+)?", _FLAGS)


def _normalize_keyword(token: str) -> str:
    return js_trim(token).strip(_KEYWORD_PUNCTUATION).lower()


def extract_ref(text: str, allow_bare: bool) -> Optional[str]:
    """The patch/command id a text refers to: a UUID, an id after an apply term, or (when
    ``allow_bare``) the whole text if it looks like an id (§5.4)."""
    trimmed = js_trim(text)
    if not trimmed:
        return None
    uuid = _UUID.search(trimmed)
    if uuid:
        return uuid.group(0)
    after_term = _APPLY_REF.search(trimmed)
    if after_term:
        return after_term.group(1)
    if allow_bare and _BARE_REF.match(trimmed):
        return trimmed
    return None


def _parse_keyword(keyword: str, payload: str, body: str) -> tuple[bool, Optional[ParsedCommand]]:
    """The keyword table (§5.2): ``(matched, result)``; a matched row never falls through."""
    if keyword in _HELP_KEYWORDS:
        return True, {"kind": "help"}
    if keyword in _STATUS_KEYWORDS:
        return True, {"kind": "status"}
    if keyword in _TEST_TERMS:
        return True, ({"kind": "test", "prompt": payload} if payload else {"kind": "test"})
    if keyword in _PLAN_KEYWORDS:
        return True, ({"kind": "plan", "prompt": payload} if payload else None)
    if keyword in _PATCH_KEYWORDS:
        if not payload:
            return True, None
        return True, {"kind": "patch", "prompt": payload if keyword in _PATCH_PAYLOAD_ONLY else body}
    if keyword in _APPLY_TERMS:
        ref = extract_ref(payload or body, True)
        return True, ({"kind": "apply", "refId": ref} if ref else None)
    return False, None


def _is_help(body: str) -> bool:
    if _HELP_WORD.search(body.lower()) or any(phrase in body for phrase in _HELP_PHRASES):
        return True
    return any(word in body for word in _COMMAND_WORDS) and any(
        word in body for word in _COMMAND_QUESTION_WORDS
    )


def _is_status(body: str) -> bool:
    return bool(_STATUS_WORD.search(body.lower())) or any(phrase in body for phrase in _STATUS_PHRASES)


def _parse_test(body: str) -> Optional[ParsedCommand]:
    text = js_trim(body)
    if any(text == term + suffix for term in _TEST_TERMS for suffix in _TEST_SUFFIXES):
        return {"kind": "test"}
    match = _TEST_SHAPE.match(text)
    if not match:
        return None
    payload = js_trim(match.group(1) or "")
    if not payload or payload in _TEST_SUFFIXES:
        return {"kind": "test"}
    return {"kind": "test", "prompt": payload}


def _is_patch(body: str) -> bool:
    if _FILE_LIKE.search(body) or _PATCH_VERB_START.match(body):
        return True
    has_hint = any(hint in body for hint in _PATCH_HINTS)
    if has_hint and any(prefix in body for prefix in _POLITE_PREFIXES):
        return True
    return has_hint and any(target in body for target in _TARGET_HINTS)


def parse_dev_command(text: str) -> Optional[ParsedCommand]:
    """``parseDevCommand``: the DSL reading of a chat message, or None when nothing matches."""
    raw = js_trim(text)
    body = js_trim(raw[len(DEV_PREFIX):]) if raw.startswith(DEV_PREFIX) else raw
    if not body:
        return None
    keyword, *rest = _WS_SPLIT.split(body)
    payload = js_trim(" ".join(rest))
    matched, result = _parse_keyword(_normalize_keyword(keyword), payload, body)
    if matched:
        return result
    if _APPLY_INTENT.search(body):
        ref = extract_ref(body, True)
        if ref:
            return {"kind": "apply", "refId": ref}
    if _is_help(body):
        return {"kind": "help"}
    if _is_status(body):
        return {"kind": "status"}
    test = _parse_test(body)
    if test:
        return test
    if _is_patch(body):
        return {"kind": "patch", "prompt": body}
    return None


def natural_language_task_prompt(text: str) -> Optional[str]:
    """The prompt sent for a task: the trimmed text without a leading ``@dev`` (any case)."""
    trimmed = js_trim(text)
    if not trimmed:
        return None
    prefix = _TASK_PREFIX.match(trimmed)
    if not prefix:
        return trimmed
    return js_trim(trimmed[prefix.end():]) or None


def wecom_kind(parsed: Optional[ParsedCommand]) -> str:
    """The kind the relay dispatches: help and status survive, everything else is a task."""
    kind = parsed.get("kind") if parsed else None
    return kind if kind in ("help", "status") else "task"


def _fingerprint_segment(value: Optional[str]) -> str:
    return js_trim(collapse_whitespace(value or "")).lower()


def command_fingerprint(
    user_id: Optional[str],
    machine_id: Optional[str],
    kind: str,
    ref_id: Optional[str] = None,
    prompt: Optional[str] = None,
) -> str:
    """The idempotency key of the (dormant) command fingerprint dedupe (§4.6)."""
    preimage = "|".join(
        [
            _fingerprint_segment(user_id),
            _fingerprint_segment(machine_id),
            kind,
            _fingerprint_segment(ref_id),
            _fingerprint_segment(prompt),
        ]
    )
    return "cmdfp:" + hashlib.sha256(preimage.encode("utf-8")).hexdigest()


def should_apply_fingerprint_dedupe(kind: Optional[str]) -> bool:
    """Only patch, apply and test commands are fingerprinted, which never happens on the WeCom
    path because those kinds are collapsed to task first."""
    return kind in FINGERPRINT_KINDS
