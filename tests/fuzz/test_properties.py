"""Property tests (hypothesis): the parsers that read outside input never raise anything but their
own documented errors, on any input, and the round trips hold."""
from __future__ import annotations

import json
import unicodedata
from typing import Any, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import dsl
from relay.agents.auth import AgentAuth, bearer_token
from relay.agents.channel import _parse_frame
from relay.domains import audit, idempotency, inflight, locale, machines, templates
from relay.ids import valid_id
from relay.jsontext import parse_strict
from relay.lifecycle.types import InboundMessage
from relay.messages import js_trim
from relay.routes.wecom_io import CallbackRejected, CryptoConfig, check_unsigned_callback, inbound_from_body
from relay.stores.envelope import EnvelopeError, comparable, raw_updated_at_ms
from relay.stores.keys import escape_id
from relay.wecom.crypto import (
    WeComCryptoError,
    create_signature,
    decrypt_message,
    encrypt_message,
    verify_plain_signature,
    verify_signature,
)
from relay.wecom.xml import build_text_reply, from_xml_payload, looks_like_xml, parse_wecom_xml

AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CONFIG = CryptoConfig(token="tok", aes_key=AES_KEY, corp_id="corp", callback_secret="s", timestamp_tolerance_s=300)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Text of every kind: any code point (lone surrogates included), and text built from the DSL's words.
ANY_TEXT = st.text(st.characters(codec=None), max_size=300)
DSL_WORDS = st.sampled_from(["@dev", "@DEV", "help", "status", "plan", "patch", "apply", "test", "task", "#", "ref",
                             "状态", "帮助", "应用", "补丁", "修复", "请", " ", "\n", "\u3000", "abc123", "--", ":"])
DSL_TEXT = st.lists(DSL_WORDS, max_size=12).map("".join) | ANY_TEXT
XML_TEXT = st.lists(st.sampled_from([
    "<xml>", "</xml>", "<Content>", "</Content>", "<MsgId>", "</MsgId>", "<FromUserName>", "</FromUserName>",
    "<Encrypt>", "</Encrypt>", "<![CDATA[", "]]>", "<!DOCTYPE x [<!ENTITY e \"v\">]>", "&e;", "&amp;", " ", "x",
]), max_size=20).map("".join) | ANY_TEXT
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT | st.sampled_from(
        ["msgId", "userId", "machineId", "text", "message", "encrypt", "Encrypt", "xml", "fromUserName", "toUserName"]),
        inner, max_size=6),
    max_leaves=20)


# -- the @dev DSL ---------------------------------------------------------------------------------------
@FAST
@given(DSL_TEXT)
def test_the_dsl_reads_any_text(text: str) -> None:
    parsed = dsl.parse_dev_command(text)
    assert parsed is None or parsed["kind"] in {"help", "status", "plan", "patch", "apply", "test", "task"}
    assert dsl.wecom_kind(parsed) in {"help", "status", "task"}
    prompt = dsl.natural_language_task_prompt(text)
    assert prompt is None or prompt


# -- WeCom XML -------------------------------------------------------------------------------------------
@FAST
@given(XML_TEXT)
def test_the_xml_reader_reads_any_text_and_expands_nothing(text: str) -> None:
    fields = parse_wecom_xml(text)
    assert set(fields) == {"toUserName", "fromUserName", "createTime", "msgType", "content", "msgId", "encrypt"}
    for value in fields.values():
        assert value is None or (value in text)  # a slice of the input: nothing decoded or expanded
    from_xml_payload(text)
    looks_like_xml(text)


@FAST
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=100).filter(
    lambda s: "]]>" not in s and js_trim(s)))
def test_a_passive_reply_reads_back_its_content(content: str) -> None:
    reply = build_text_reply("user", "corp", content, 1700000000)
    assert parse_wecom_xml(reply)["content"] == js_trim(content)


# -- crypto ----------------------------------------------------------------------------------------------
@FAST
@given(ANY_TEXT)
def test_decrypting_anything_raises_only_the_crypto_error(ciphertext: str) -> None:
    try:
        decrypt_message(ciphertext, AES_KEY)
    except WeComCryptoError:
        pass


@FAST
@given(ANY_TEXT, st.text(max_size=40))
def test_any_key_is_a_crypto_error_or_works(key: str, message: str) -> None:
    try:
        assert decrypt_message(encrypt_message(message, key, "corp"), key) == message
    except WeComCryptoError:
        pass


@FAST
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=500), st.text(max_size=30),
       st.binary(min_size=16, max_size=16))
def test_encrypt_then_decrypt_is_the_message(message: str, receive_id: str, prefix: bytes) -> None:
    assert decrypt_message(encrypt_message(message, AES_KEY, receive_id, lambda n: prefix), AES_KEY) == message


@FAST
@given(ANY_TEXT, ANY_TEXT, ANY_TEXT, ANY_TEXT, ANY_TEXT)
def test_signatures_compare_anything(token: str, timestamp: str, nonce: str, data: str, signature: str) -> None:
    assert verify_signature(token, timestamp, nonce, data, create_signature(token, timestamp, nonce, data))
    verify_signature(token, timestamp, nonce, data, signature)
    verify_plain_signature(token, timestamp, nonce, signature)


# -- envelopes -------------------------------------------------------------------------------------------
SCHEMAS = [d.DOMAIN.schema for d in (idempotency, machines, inflight, audit, templates, locale)]


@FAST
@pytest.mark.parametrize("schema", SCHEMAS, ids=[d.DOMAIN.name for d in (idempotency, machines, inflight, audit,
                                                                          templates, locale)])
@given(raw=ANY_TEXT | JSON_VALUES.map(json.dumps) | JSON_VALUES.map(
    lambda data: json.dumps({"version": 1, "updatedAt": "2026-01-01T00:00:00.000Z", "data": data})))
def test_decoding_any_stored_value_is_an_entry_or_a_counted_miss(schema: Any, raw: str) -> None:
    try:
        schema.decode(raw)
    except EnvelopeError:
        pass
    comparable(raw)
    raw_updated_at_ms(raw)


# -- callbacks, frames, ids, tokens ------------------------------------------------------------------------
@FAST
@given(JSON_VALUES | XML_TEXT, st.dictionaries(st.sampled_from(["msg_signature", "timestamp", "nonce", "signature"]),
                                               ANY_TEXT, max_size=4))
def test_any_callback_body_is_a_message_or_a_clean_refusal(body: Any, query: dict[str, str]) -> None:
    try:
        msg = inbound_from_body(body, query, CONFIG, now_s=1_700_000_000)
        check_unsigned_callback(query, None, CONFIG, now_s=1_700_000_000)
    except CallbackRejected as rejected:
        assert 400 <= rejected.http_status < 500
        return
    assert isinstance(msg, InboundMessage)


@FAST
@given(ANY_TEXT | st.binary(max_size=200))
def test_any_frame_is_an_object_or_nothing(message: Any) -> None:
    frame = _parse_frame(message)
    assert frame is None or isinstance(frame, dict)


def _as_json_parse_reads(digits: str) -> Union[int, float]:
    """An integer as ``parse_strict`` reads it: within 64 bits as it is, beyond as a float (as
    ``JSON.parse`` does), and beyond a float's range (which orjson refuses) whole, as the standard
    library reads it."""
    number = int(digits)
    if -(2**63) <= number < 2**64:
        return number
    try:
        return float(number)
    except OverflowError:
        return number


@FAST
@given(JSON_VALUES)
def test_json_text_round_trips(value: Any) -> None:
    text = json.dumps(value)
    assert parse_strict(text) == json.loads(text, parse_int=_as_json_parse_reads)


def test_integers_just_beyond_64_bits_come_back_as_floats() -> None:
    read = parse_strict(json.dumps([-(2**63), -(2**63) - 1, 2**64 - 1, 2**64]))

    assert read == [-(2**63), float(-(2**63) - 1), 2**64 - 1, float(2**64)]
    assert [type(number) for number in read] == [int, float, int, float]


@FAST
@given(ANY_TEXT | st.lists(st.sampled_from(["[", "]", "{", "}", ":", ",", '"', "1e999", "NaN", "-", "0"]),
                           max_size=30).map("".join))
def test_any_text_parses_or_is_invalid_json(text: str) -> None:
    try:
        parse_strict(text)
    except ValueError:
        pass


@FAST
@given(ANY_TEXT, JSON_VALUES, st.none() | ANY_TEXT)
def test_agent_auth_judges_any_hello(machine_id: str, frame: Any, authorization: Any) -> None:
    auth = AgentAuth("shared", {"m1": "own"})
    hello = frame if isinstance(frame, dict) else {"token": frame}
    assert auth.allows(machine_id, hello, authorization) in (True, False)
    bearer_token(authorization)


@FAST
@given(st.one_of(ANY_TEXT, JSON_VALUES))
def test_id_validation_answers_anything(value: Any) -> None:
    ok = valid_id(value)
    assert not ok or (isinstance(value, str) and 0 < len(value) <= 128)


@FAST
@given(st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=128))
def test_ascii_ids_are_judged_by_their_character_categories(value: str) -> None:
    refused = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
    assert valid_id(value) == all(unicodedata.category(ch) not in refused for ch in value)


@FAST
@given(ANY_TEXT, ANY_TEXT)
def test_escaped_ids_are_injective_and_plain(first: str, second: str) -> None:
    a, b = escape_id(first), escape_id(second)
    assert (a == b) == (first == second)
    assert not set(a) & set(":{}*?[] \n")
