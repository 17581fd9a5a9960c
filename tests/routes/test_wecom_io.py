"""The callback's wire rules as pure functions: reference §2.11, §4.1-4.3 and §4.8."""
from __future__ import annotations

import itertools
import re
from typing import Any, Optional

import pytest

from relay.lifecycle.types import Ack, InboundMessage
from relay.routes.wecom_io import (
    CallbackRejected,
    CryptoConfig,
    inbound_from_body,
    read_callback_body,
    render_ack,
    reply_nonce,
    verify_url,
)
from relay.wecom.crypto import create_signature, decrypt_message, encrypt_message
from relay.wecom.xml import parse_wecom_xml

TOKEN = "token1"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP_ID = "ww123456"
CRYPTO = CryptoConfig(token=TOKEN, aes_key=AES_KEY, corp_id=CORP_ID)
NOW_MS = 1795632479123
NOW_S = "1795632479"

XML_BODY = (
    "<xml><ToUserName><![CDATA[corp]]></ToUserName><FromUserName><![CDATA[u1]]></FromUserName>"
    "<CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>"
    "<Content><![CDATA[ @dev status ]]></Content><MsgId>m-1</MsgId><AgentID>1000002</AgentID></xml>"
)


_DRAWS = itertools.count()


def counter_random(n: int) -> bytes:
    """Deterministic random bytes that differ from one draw to the next."""
    seed = next(_DRAWS)
    return bytes((seed + i) % 256 for i in range(n))


def fixed_random(n: int) -> bytes:
    return bytes(range(n))


def signed_query(encrypted: str, token: str = TOKEN, timestamp: str = "1700000000", nonce: str = "nonce1") -> dict[str, str]:
    return {
        "msg_signature": create_signature(token, timestamp, nonce, encrypted),
        "timestamp": timestamp,
        "nonce": nonce,
    }


def inbound(body: Any, query: Optional[dict[str, str]] = None, config: CryptoConfig = CRYPTO) -> InboundMessage:
    return inbound_from_body(body, query or {}, config)


def rejected(body: Any, query: Optional[dict[str, str]] = None, config: CryptoConfig = CRYPTO) -> tuple[int, str]:
    with pytest.raises(CallbackRejected) as caught:
        inbound_from_body(body, query or {}, config)
    return caught.value.http_status, caught.value.error


# -- §4.1 body interpretation -------------------------------------------------------------------


def test_string_body_is_wecom_xml_in_xml_mode() -> None:
    msg = inbound(XML_BODY)
    assert msg == InboundMessage(
        msg_id="m-1", user_id="u1", machine_id=None, text="@dev status",
        reply_to="u1", reply_from="corp", xml_mode=True, encrypted=False,
    )


def test_xml_msg_id_falls_back_to_sender_and_create_time() -> None:
    body = XML_BODY.replace("<MsgId>m-1</MsgId>", "")
    assert inbound(body).msg_id == "u1-1700000000"


def test_xml_without_msg_id_or_create_time_has_no_msg_id() -> None:
    body = XML_BODY.replace("<MsgId>m-1</MsgId>", "").replace("<CreateTime>1700000000</CreateTime>", "")
    assert inbound(body).msg_id is None


def test_xml_gives_no_machine_id() -> None:
    body = XML_BODY.replace("</xml>", "<MachineId>dev-1</MachineId></xml>")
    assert inbound(body).machine_id is None


def test_empty_string_body_is_xml_mode_with_empty_fields() -> None:
    msg = inbound("")
    assert msg.xml_mode is True
    assert (msg.msg_id, msg.user_id, msg.text) == (None, None, None)


@pytest.mark.parametrize("field", ["xml", "XML", "payload", "body"])
def test_dict_field_carrying_xml_is_read_as_xml(field: str) -> None:
    msg = inbound({field: "  \n" + XML_BODY, "msgId": "ignored"})
    assert (msg.msg_id, msg.user_id, msg.text, msg.xml_mode) == ("m-1", "u1", "@dev status", True)


def test_first_non_empty_xml_field_wins() -> None:
    other = XML_BODY.replace("m-1", "m-2")
    msg = inbound({"xml": "   ", "XML": XML_BODY, "payload": other})
    assert msg.msg_id == "m-1"


def test_first_non_empty_carrier_that_is_not_xml_means_aliases() -> None:
    msg = inbound({"xml": "hello", "body": XML_BODY, "msgId": "j-1", "userId": "u9", "text": "hi"})
    assert (msg.msg_id, msg.user_id, msg.text, msg.xml_mode) == ("j-1", "u9", "hi", False)


@pytest.mark.parametrize(
    ("body", "attribute", "expected"),
    [
        ({"msgId": "a"}, "msg_id", "a"),
        ({"MsgId": "a"}, "msg_id", "a"),
        ({"userId": "u"}, "user_id", "u"),
        ({"UserId": "u"}, "user_id", "u"),
        ({"machineId": "m"}, "machine_id", "m"),
        ({"MachineId": "m"}, "machine_id", "m"),
        ({"text": "t"}, "text", "t"),
        ({"Text": "t"}, "text", "t"),
        ({"content": "t"}, "text", "t"),
        ({"Content": "t"}, "text", "t"),
        ({"fromUserName": "f"}, "reply_to", "f"),
        ({"FromUserName": "f"}, "reply_to", "f"),
        ({"toUserName": "c"}, "reply_from", "c"),
        ({"ToUserName": "c"}, "reply_from", "c"),
    ],
)
def test_every_alias_is_read(body: dict[str, str], attribute: str, expected: str) -> None:
    assert getattr(inbound(body), attribute) == expected


def test_alias_takes_first_non_empty_trimmed_string() -> None:
    msg = inbound({"msgId": "   ", "MsgId": " m-2 ", "text": 5, "Text": "", "content": "\u3000hi\ufeff", "Content": "no"})
    assert msg.msg_id == "m-2"
    assert msg.text == "hi"


def test_alias_order_prefers_the_first_name() -> None:
    assert inbound({"Content": "last", "text": "first"}).text == "first"


def test_encrypt_alias_marks_the_request_encrypted() -> None:
    inner = "<xml><FromUserName>u1</FromUserName><ToUserName>corp</ToUserName><MsgId>1</MsgId><Content>x</Content></xml>"
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID, fixed_random)
    assert inbound({"Encrypt": encrypted}, signed_query(encrypted)).encrypted is True


@pytest.mark.parametrize("body", [None, [], [{"msgId": "a"}], 5, True, {}])
def test_non_dict_or_empty_bodies_give_empty_fields(body: Any) -> None:
    assert inbound(body) == InboundMessage()


def test_json_with_both_user_names_is_xml_mode() -> None:
    msg = inbound({"fromUserName": "u1", "toUserName": "corp", "msgId": "1", "text": "hi"})
    assert msg.xml_mode is True
    assert msg.user_id == "u1"


def test_json_with_one_user_name_is_not_xml_mode() -> None:
    assert inbound({"fromUserName": "u1", "msgId": "1", "text": "hi"}).xml_mode is False


# -- §4.2 normalising ----------------------------------------------------------------------------


def test_message_fields_win_over_top_level() -> None:
    body = {
        "msgId": "top", "userId": "top-user", "machineId": "top-m", "text": "top-text",
        "fromUserName": "top-from", "toUserName": "top-to",
        "message": {"msgId": "in", "userId": "in-user", "machineId": "in-m", "text": "in-text",
                    "fromUserName": "in-from", "toUserName": "in-to"},
    }
    msg = inbound(body)
    assert (msg.msg_id, msg.user_id, msg.machine_id, msg.text) == ("in", "in-user", "in-m", "in-text")
    assert (msg.reply_to, msg.reply_from) == ("in-from", "in-to")


def test_message_null_falls_through_but_empty_string_does_not() -> None:
    msg = inbound({"msgId": "top", "text": "top-text", "message": {"msgId": None, "text": ""}})
    assert msg.msg_id == "top"
    assert msg.text == ""


def test_message_values_are_not_trimmed() -> None:
    assert inbound({"message": {"text": "  hi  "}}).text == "  hi  "


def test_user_id_falls_back_to_reply_target() -> None:
    assert inbound({"fromUserName": "sender", "msgId": "1"}).user_id == "sender"
    assert inbound({"message": {"fromUserName": "inner"}, "fromUserName": "outer"}).user_id == "inner"


def test_user_id_prefers_top_level_user_id_over_reply_target() -> None:
    assert inbound({"userId": "u", "message": {"fromUserName": "inner"}}).user_id == "u"


@pytest.mark.parametrize("message", [["msgId"], "msgId", 5])
def test_message_that_is_not_an_object_is_ignored(message: Any) -> None:
    assert inbound({"msgId": "top", "message": message}).msg_id == "top"


@pytest.mark.parametrize("value", [5, True, {"a": 1}, ["x"]])
def test_non_string_message_field_is_invalid_payload(value: Any) -> None:
    assert rejected({"msgId": "top", "message": {"msgId": value}}) == (400, "invalid_payload")


# -- §4.3 encrypted envelope --------------------------------------------------------------------


def encrypted_body(inner: str) -> tuple[str, dict[str, str]]:
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID, fixed_random)
    outer = f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    return outer, signed_query(encrypted)


INNER_XML = (
    "<xml><ToUserName><![CDATA[ww123456]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>"
    "<CreateTime>1700000001</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[状态]]></Content>"
    "<MsgId>998877</MsgId></xml>"
)


@pytest.mark.parametrize("config", [CryptoConfig(aes_key=AES_KEY), CryptoConfig(token=TOKEN), CryptoConfig()])
def test_encrypt_without_token_or_key_is_missing_crypto_config(config: CryptoConfig) -> None:
    body, query = encrypted_body(INNER_XML)
    assert rejected(body, query, config) == (400, "missing_wecom_crypto_config")


@pytest.mark.parametrize("missing", ["msg_signature", "timestamp", "nonce"])
def test_encrypt_without_a_query_field_is_missing_signature_fields(missing: str) -> None:
    body, query = encrypted_body(INNER_XML)
    query[missing] = ""
    assert rejected(body, query) == (400, "missing_signature_fields")
    del query[missing]
    assert rejected(body, query) == (400, "missing_signature_fields")


def test_encrypt_with_wrong_signature_is_401() -> None:
    body, query = encrypted_body(INNER_XML)
    query["msg_signature"] = query["msg_signature"].upper()
    assert rejected(body, query) == (401, "invalid_signature")


def test_encrypt_that_does_not_decrypt_is_invalid_encrypted_payload() -> None:
    garbage = "not-a-ciphertext"
    assert rejected({"encrypt": garbage}, signed_query(garbage)) == (400, "invalid_encrypted_payload")


def test_decrypted_xml_replaces_the_outer_message_and_reply_target() -> None:
    body, query = encrypted_body(INNER_XML)
    msg = inbound(body, query)
    assert msg == InboundMessage(
        msg_id="998877", user_id="zhangsan", machine_id=None, text="状态",
        reply_to="zhangsan", reply_from="ww123456", xml_mode=True, encrypted=True,
    )


def test_decrypted_json_is_read_without_aliases_or_trimming() -> None:
    inner = '{"MsgId":"alias","msgId":" j-1 ","UserId":"alias","userId":"u1","machineId":"dev-1","Content":"alias","text":" hi "}'
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID, fixed_random)
    msg = inbound({"encrypt": encrypted, "msgId": "outer"}, signed_query(encrypted))
    assert (msg.msg_id, msg.user_id, msg.machine_id, msg.text) == (" j-1 ", "u1", "dev-1", " hi ")
    assert (msg.xml_mode, msg.encrypted) == (False, True)


def test_decrypted_json_honours_nested_message() -> None:
    inner = '{"msgId":"top","message":{"msgId":"in","fromUserName":"f","toUserName":"t"}}'
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID, fixed_random)
    msg = inbound({"encrypt": encrypted}, signed_query(encrypted))
    assert (msg.msg_id, msg.user_id, msg.reply_to, msg.reply_from) == ("in", "f", "f", "t")


def test_xml_mode_comes_from_the_outer_body() -> None:
    encrypted = encrypt_message(INNER_XML, AES_KEY, CORP_ID, fixed_random)
    msg = inbound({"encrypt": encrypted}, signed_query(encrypted))
    assert (msg.xml_mode, msg.encrypted, msg.reply_to) == (False, True, "zhangsan")


@pytest.mark.parametrize("inner", ["not json", "{", "NaN", ""])
def test_decrypted_text_neither_xml_nor_json_is_invalid_decrypted_payload(inner: str) -> None:
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID, fixed_random)
    assert rejected({"encrypt": encrypted}, signed_query(encrypted)) == (400, "invalid_decrypted_payload")


@pytest.mark.parametrize("inner", ["[1]", "5", '"text"', "null"])
def test_decrypted_json_that_is_not_an_object_gives_empty_fields(inner: str) -> None:
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID, fixed_random)
    msg = inbound({"encrypt": encrypted}, signed_query(encrypted))
    assert (msg.msg_id, msg.user_id, msg.text, msg.encrypted) == (None, None, None, True)


def test_decrypted_json_non_string_field_is_invalid_payload() -> None:
    encrypted = encrypt_message('{"msgId":5,"userId":"u","text":"x"}', AES_KEY, CORP_ID, fixed_random)
    assert rejected({"encrypt": encrypted}, signed_query(encrypted)) == (400, "invalid_payload")


def test_empty_encrypt_value_is_not_an_envelope() -> None:
    msg = inbound({"encrypt": "  ", "msgId": "1", "userId": "u", "text": "t"})
    assert msg.encrypted is False
    assert read_callback_body({"encrypt": "  "}).encrypt is None


# -- §2.11 GET verification ---------------------------------------------------------------------


@pytest.mark.parametrize("query", [{}, {"echostr": ""}])
def test_verify_without_echostr_is_400(query: dict[str, str]) -> None:
    rendered = verify_url(query, CRYPTO)
    assert (rendered.status, rendered.body) == (400, '{"error":"missing_echostr"}')


def test_verify_with_bad_signature_is_401() -> None:
    rendered = verify_url({"echostr": "echo-123", "msg_signature": "bad", "timestamp": "1", "nonce": "n"},
                          CryptoConfig(token=TOKEN))
    assert (rendered.status, rendered.content_type, rendered.body) == (
        401, "application/json; charset=utf-8", '{"error":"invalid_signature"}')


def test_verify_skips_the_signature_when_none_is_sent() -> None:
    rendered = verify_url({"echostr": "echo-123", "timestamp": "1", "nonce": "n"}, CryptoConfig(token=TOKEN))
    assert (rendered.status, rendered.content_type, rendered.body) == (200, "text/plain", "echo-123")


@pytest.mark.parametrize("missing", ["timestamp", "nonce"])
def test_verify_with_a_signature_but_a_missing_field_is_400(missing: str) -> None:
    # Deliberate change (reference §13 item 3): the reference skipped the check here.
    query = {"echostr": "echo-123", "msg_signature": "bad", "timestamp": "1", "nonce": "n"}
    del query[missing]
    rendered = verify_url(query, CryptoConfig(token=TOKEN))
    assert (rendered.status, rendered.body) == (400, '{"error":"missing_signature_fields"}')


def test_verify_skips_the_signature_without_a_token() -> None:
    rendered = verify_url({"echostr": "echo-123", "msg_signature": "bad", "timestamp": "1", "nonce": "n"}, CryptoConfig())
    assert (rendered.status, rendered.body) == (200, "echo-123")


def test_verify_with_good_signature_echoes_plain_echostr_without_aes_key() -> None:
    query = {"echostr": "echo-123", **signed_query("echo-123")}
    rendered = verify_url(query, CryptoConfig(token=TOKEN))
    assert (rendered.status, rendered.content_type, rendered.body) == (200, "text/plain", "echo-123")


def test_verify_decrypts_echostr_with_aes_key() -> None:
    echostr = encrypt_message("echo-123", AES_KEY, CORP_ID, fixed_random)
    rendered = verify_url({"echostr": echostr, **signed_query(echostr)}, CRYPTO)
    assert (rendered.status, rendered.content_type, rendered.body) == (200, "text/plain", "echo-123")


def test_verify_with_undecryptable_echostr_is_clean_400() -> None:
    rendered = verify_url({"echostr": "abc"}, CRYPTO)
    assert (rendered.status, rendered.body) == (400, '{"error":"invalid_echostr"}')


# -- §4.8 acks ------------------------------------------------------------------------------------

HANDSHAKE = "命令已接收，已分发到本地代理。"
ACKS = {
    "sent_to_agent": {"status": "sent_to_agent", "commandId": "c-1", "passiveMessage": HANDSHAKE, "locale": "zh-CN"},
    "machine_offline": {"status": "machine_offline", "machineId": "dev-machine-1", "commandId": "c-2", "locale": "zh-CN"},
    "duplicate_ignored": {"status": "duplicate_ignored", "locale": "en"},
    "ignored_non_dev_message": {"status": "ignored_non_dev_message", "locale": "zh-CN"},
}
PASSIVE_CONTENT = {
    "sent_to_agent": HANDSHAKE,
    "machine_offline": "命令未执行：目标机器离线。",
    "duplicate_ignored": "Duplicate message ignored.",
    "ignored_non_dev_message": "消息已接收。",
}
XML_MSG = InboundMessage(msg_id="1", user_id="u1", text="x", reply_to="u1", reply_from="corp", xml_mode=True)


def passive_xml(content: str, to: str = "u1", from_: str = "corp") -> str:
    return (
        f"<xml><ToUserName><![CDATA[{to}]]></ToUserName><FromUserName><![CDATA[{from_}]]></FromUserName>"
        f"<CreateTime>{NOW_S}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{content}]]></Content></xml>"
    )


def render(payload: dict[str, Any], msg: InboundMessage, config: CryptoConfig = CRYPTO, status: int = 200):
    return render_ack(Ack(status, payload), msg, config, NOW_MS, counter_random)


def test_json_acks_keep_key_order_and_utf8() -> None:
    expected = {
        "sent_to_agent": '{"status":"sent_to_agent","commandId":"c-1","passiveMessage":"命令已接收，已分发到本地代理。","locale":"zh-CN"}',
        "machine_offline": '{"status":"machine_offline","machineId":"dev-machine-1","commandId":"c-2","locale":"zh-CN"}',
        "duplicate_ignored": '{"status":"duplicate_ignored","locale":"en"}',
        "ignored_non_dev_message": '{"status":"ignored_non_dev_message","locale":"zh-CN"}',
    }
    for status, payload in ACKS.items():
        rendered = render(payload, InboundMessage(msg_id="1", user_id="u1", text="x"))
        assert (rendered.status, rendered.content_type, rendered.body) == (
            200, "application/json; charset=utf-8", expected[status])


@pytest.mark.parametrize("status", list(ACKS))
def test_xml_mode_acks_are_passive_text_replies(status: str) -> None:
    rendered = render(ACKS[status], XML_MSG)
    assert (rendered.status, rendered.content_type) == (200, "application/xml")
    assert rendered.body == passive_xml(PASSIVE_CONTENT[status])


def test_passive_offline_reply_matches_the_transcript() -> None:
    rendered = render(ACKS["machine_offline"], XML_MSG)
    assert rendered.body == (
        "<xml><ToUserName><![CDATA[u1]]></ToUserName><FromUserName><![CDATA[corp]]></FromUserName>"
        "<CreateTime>1795632479</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        "<Content><![CDATA[命令未执行：目标机器离线。]]></Content></xml>"
    )


def test_passive_reply_uses_the_english_line_and_the_fallback_for_unknown_statuses() -> None:
    assert render({"status": "machine_offline", "locale": "en"}, XML_MSG).body == passive_xml(
        "Command not executed: target machine is offline.")
    assert render({"status": "something_else", "locale": "zh-CN"}, XML_MSG).body == passive_xml("请求已接收。")


@pytest.mark.parametrize("status", list(ACKS))
def test_xml_mode_without_passive_reply_is_plain_success(status: str) -> None:
    rendered = render(ACKS[status], XML_MSG, CryptoConfig(token=TOKEN, aes_key=AES_KEY, corp_id=CORP_ID, passive_reply=False))
    assert (rendered.status, rendered.content_type, rendered.body) == (200, "text/plain", "success")


@pytest.mark.parametrize(("reply_to", "reply_from"), [(None, "corp"), ("u1", None), ("", "corp")])
def test_incomplete_reply_target_is_plain_success(reply_to: Optional[str], reply_from: Optional[str]) -> None:
    msg = InboundMessage(msg_id="1", user_id="u1", text="x", reply_to=reply_to, reply_from=reply_from, xml_mode=True)
    assert render(ACKS["machine_offline"], msg).body == "success"


def test_sent_to_agent_without_passive_message_is_plain_success() -> None:
    rendered = render({"status": "sent_to_agent", "commandId": "c", "passiveMessage": "", "locale": "en"}, XML_MSG)
    assert (rendered.content_type, rendered.body) == ("text/plain", "success")


def test_passive_reply_escapes_cdata_terminators() -> None:
    rendered = render({"status": "sent_to_agent", "passiveMessage": "a]]>b", "locale": "en"}, XML_MSG)
    assert "<Content><![CDATA[a]]]]><![CDATA[>b]]></Content>" in rendered.body


@pytest.mark.parametrize("status", [400, 403, 429, 500])
def test_error_acks_are_json_even_in_xml_mode(status: int) -> None:
    msg = InboundMessage(reply_to="u1", reply_from="corp", xml_mode=True, encrypted=True)
    rendered = render({"error": "rate_limited"}, msg, status=status)
    assert (rendered.status, rendered.content_type, rendered.body) == (
        status, "application/json; charset=utf-8", '{"error":"rate_limited"}')


ENCRYPTED_MSG = InboundMessage(msg_id="1", user_id="zhangsan", text="x", reply_to="zhangsan",
                               reply_from="ww123456", xml_mode=True, encrypted=True)
ENVELOPE = re.compile(
    r"<xml><Encrypt><!\[CDATA\[(?P<encrypt>[A-Za-z0-9+/=]+)\]\]></Encrypt>"
    r"<MsgSignature><!\[CDATA\[(?P<signature>[0-9a-f]{40})\]\]></MsgSignature>"
    r"<TimeStamp>(?P<timestamp>\d+)</TimeStamp><Nonce><!\[CDATA\[(?P<nonce>[0-9a-f]{16})\]\]></Nonce></xml>"
)


def open_envelope(body: str) -> str:
    """Check the envelope's layout and signature; return the decrypted inner text."""
    match = ENVELOPE.fullmatch(body)
    assert match, body
    assert match["timestamp"] == NOW_S
    assert match["signature"] == create_signature(TOKEN, match["timestamp"], match["nonce"], match["encrypt"])
    return decrypt_message(match["encrypt"], AES_KEY)


@pytest.mark.parametrize("status", list(ACKS))
def test_encrypted_acks_wrap_the_passive_reply(status: str) -> None:
    rendered = render(ACKS[status], ENCRYPTED_MSG)
    assert (rendered.status, rendered.content_type) == (200, "application/xml")
    inner = open_envelope(rendered.body)
    assert inner == passive_xml(PASSIVE_CONTENT[status], to="zhangsan", from_="ww123456")
    assert parse_wecom_xml(inner)["content"] == PASSIVE_CONTENT[status]


def test_encrypted_ack_without_passive_reply_wraps_success() -> None:
    config = CryptoConfig(token=TOKEN, aes_key=AES_KEY, corp_id=CORP_ID, passive_reply=False)
    rendered = render(ACKS["machine_offline"], ENCRYPTED_MSG, config)
    assert open_envelope(rendered.body) == "success"


def test_encrypted_ack_is_deterministic_given_the_random_source() -> None:
    first = render_ack(Ack(200, ACKS["duplicate_ignored"]), ENCRYPTED_MSG, CRYPTO, NOW_MS, fixed_random)
    second = render_ack(Ack(200, ACKS["duplicate_ignored"]), ENCRYPTED_MSG, CRYPTO, NOW_MS, fixed_random)
    assert first == second
    assert ENVELOPE.fullmatch(first.body)["nonce"] == reply_nonce(fixed_random)


def test_reply_nonce_is_16_hex_digits_of_a_uuid4() -> None:
    nonce = reply_nonce(fixed_random)
    assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}", nonce)


@pytest.mark.parametrize("config", [
    CryptoConfig(token=TOKEN, aes_key=AES_KEY),
    CryptoConfig(aes_key=AES_KEY, corp_id=CORP_ID),
    CryptoConfig(token=TOKEN, corp_id=CORP_ID),
])
def test_encrypted_ack_without_full_config_is_500(config: CryptoConfig) -> None:
    rendered = render(ACKS["sent_to_agent"], ENCRYPTED_MSG, config)
    assert (rendered.status, rendered.body) == (500, '{"error":"missing_wecom_encrypted_reply_config"}')


def test_encrypted_json_request_without_user_names_gets_json() -> None:
    msg = InboundMessage(msg_id="1", user_id="u1", text="x", encrypted=True)
    rendered = render(ACKS["duplicate_ignored"], msg)
    assert (rendered.content_type, rendered.body) == (
        "application/json; charset=utf-8", '{"status":"duplicate_ignored","locale":"en"}')
