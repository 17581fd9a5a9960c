"""WeCom XML reading and writing: the wecom-xml.test.ts cases (§12), the consequences listed in
§10.7, the exact reply layouts of §10.5/§10.6 (checked against http_probe_transcript.txt) and the
safety of the regex-based reader."""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from relay.wecom.xml import (
    build_encrypted_reply,
    build_text_reply,
    from_xml_payload,
    looks_like_xml,
    parse_wecom_xml,
)

TRANSCRIPT = Path(__file__).resolve().parents[1] / "vectors" / "http_probe_transcript.txt"

PLAIN_XML = """<xml>
  <ToUserName><![CDATA[toUser]]></ToUserName>
  <FromUserName><![CDATA[fromUser]]></FromUserName>
  <CreateTime>1700000000</CreateTime>
  <MsgType><![CDATA[text]]></MsgType>
  <Content><![CDATA[@dev status]]></Content>
  <MsgId>123456</MsgId>
  <AgentID>1000002</AgentID>
</xml>"""


# -- wecom-xml.test.ts ------------------------------------------------------------------------
def test_parse_plain_text_xml() -> None:
    parsed = parse_wecom_xml(PLAIN_XML)
    assert parsed == {
        "toUserName": "toUser",
        "fromUserName": "fromUser",
        "createTime": "1700000000",
        "msgType": "text",
        "content": "@dev status",
        "msgId": "123456",
        "encrypt": None,
    }


def test_parse_encrypted_envelope() -> None:
    parsed = parse_wecom_xml("<xml><ToUserName><![CDATA[corp]]></ToUserName><Encrypt><![CDATA[abc]]></Encrypt></xml>")
    assert parsed["encrypt"] == "abc"
    assert parsed["toUserName"] == "corp"


def test_build_encrypted_reply() -> None:
    xml = build_encrypted_reply("enc", "sig", "1700000001", "nonce1")
    assert "<Encrypt><![CDATA[enc]]></Encrypt>" in xml
    assert "<MsgSignature><![CDATA[sig]]></MsgSignature>" in xml
    assert "<TimeStamp>1700000001</TimeStamp>" in xml


def test_build_text_reply() -> None:
    xml = build_text_reply("user", "corp", "hello", 1700000001)
    assert "<ToUserName><![CDATA[user]]></ToUserName>" in xml
    assert "<FromUserName><![CDATA[corp]]></FromUserName>" in xml
    assert "<CreateTime>1700000001</CreateTime>" in xml
    assert "<MsgType><![CDATA[text]]></MsgType>" in xml


# -- exact layouts (§10.5, §10.6) --------------------------------------------------------------
def test_text_reply_matches_the_transcript_byte_for_byte() -> None:
    transcript = TRANSCRIPT.read_text(encoding="utf-8")
    xml = build_text_reply("u1", "corp", "命令未执行：目标机器离线。", 1795632479)
    assert xml in transcript.splitlines()


def test_encrypted_reply_matches_the_transcript_byte_for_byte() -> None:
    lines = TRANSCRIPT.read_text(encoding="utf-8").splitlines()
    recorded = next(line for line in lines if line.startswith("<xml><Encrypt>"))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", recorded).group(1)
    xml = build_encrypted_reply(encrypt, "4a4e6e50a23b222e1318e0fdc58e5e5a1a7ab71e", 1795632479, "6baa3be2d1104482")
    assert xml == recorded


def test_cdata_and_text_escaping() -> None:
    xml = build_text_reply("a]]>b", "corp", "x]]>y]]>", "1<2&3>")
    assert "<ToUserName><![CDATA[a]]]]><![CDATA[>b]]></ToUserName>" in xml
    assert "<Content><![CDATA[x]]]]><![CDATA[>y]]]]><![CDATA[>]]></Content>" in xml
    assert "<CreateTime>1&lt;2&amp;3&gt;</CreateTime>" in xml


def test_text_reply_round_trips_through_the_reader() -> None:
    parsed = parse_wecom_xml(build_text_reply("u1", "corp", "  多行\n内容 ", 1700000001))
    assert parsed["toUserName"] == "u1"
    assert parsed["content"] == "多行\n内容"
    assert parsed["createTime"] == "1700000001"


# -- §10.7 consequences ------------------------------------------------------------------------
def test_no_entity_decoding() -> None:
    assert parse_wecom_xml("<xml><Content>a &amp; b</Content></xml>")["content"] == "a &amp; b"


def test_tag_with_attributes_is_not_found() -> None:
    assert parse_wecom_xml('<xml><Content type="x">hi</Content></xml>')["content"] is None


def test_empty_cdata_is_undefined() -> None:
    assert parse_wecom_xml("<xml><Content><![CDATA[]]></Content></xml>")["content"] is None


def test_empty_plain_text_is_undefined() -> None:
    assert parse_wecom_xml("<xml><Content>  \n </Content></xml>")["content"] is None


def test_split_cdata_is_returned_raw() -> None:
    xml = "<xml><Content><![CDATA[a]]]]><![CDATA[>b]]></Content></xml>"
    assert parse_wecom_xml(xml)["content"] == "a]]]]><![CDATA[>b"


def test_cdata_spans_lines_and_is_trimmed() -> None:
    xml = "<xml><Content>\n  <![CDATA[\n line1\nline2 \n]]>\n</Content></xml>"
    assert parse_wecom_xml(xml)["content"] == "line1\nline2"


def test_whitespace_only_cdata_is_an_empty_string() -> None:
    assert parse_wecom_xml("<xml><Content><![CDATA[   ]]></Content></xml>")["content"] == ""


def test_tags_are_case_sensitive() -> None:
    assert parse_wecom_xml("<xml><content>hi</content></xml>")["content"] is None


def test_first_occurrence_wins() -> None:
    xml = "<xml><MsgId>1</MsgId><MsgId>2</MsgId></xml>"
    assert parse_wecom_xml(xml)["msgId"] == "1"


def test_cdata_anywhere_beats_earlier_plain_text() -> None:
    xml = "<xml><Content>plain</Content><Content><![CDATA[cdata]]></Content></xml>"
    assert parse_wecom_xml(xml)["content"] == "cdata"


def test_plain_text_may_not_contain_markup() -> None:
    assert parse_wecom_xml("<xml><Content>a<b>c</b></Content></xml>")["content"] is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<xml/>", True),
        ("  \n\ufeff<xml>", True),
        ("", False),
        ("x<xml>", False),
        ('{"a":1}', False),
        ("\x85<x>", False),
    ],
)
def test_looks_like_xml(text: str, expected: bool) -> None:
    assert looks_like_xml(text) is expected


# -- normalised fields (§4.1) -----------------------------------------------------------------
def test_from_xml_payload() -> None:
    assert from_xml_payload(PLAIN_XML) == {
        "encrypt": None,
        "msgId": "123456",
        "userId": "fromUser",
        "fromUserName": "fromUser",
        "toUserName": "toUser",
        "text": "@dev status",
    }


def test_from_xml_payload_msg_id_fallback() -> None:
    xml = "<xml><FromUserName>u1</FromUserName><CreateTime>1700000000</CreateTime><Content>hi</Content></xml>"
    assert from_xml_payload(xml)["msgId"] == "u1-1700000000"
    assert from_xml_payload("<xml><FromUserName>u1</FromUserName></xml>")["msgId"] is None


def test_from_xml_payload_keeps_an_empty_msg_id() -> None:
    # ``msgId ?? fallback`` in the reference: only a missing MsgId falls back.
    xml = "<xml><MsgId><![CDATA[ ]]></MsgId><FromUserName>u1</FromUserName><CreateTime>1</CreateTime></xml>"
    assert from_xml_payload(xml)["msgId"] == ""


def test_from_xml_payload_of_an_encrypted_envelope() -> None:
    payload = from_xml_payload("<xml><ToUserName><![CDATA[corp]]></ToUserName><Encrypt><![CDATA[abc]]></Encrypt></xml>")
    assert payload == {
        "encrypt": "abc",
        "msgId": None,
        "userId": None,
        "fromUserName": None,
        "toUserName": "corp",
        "text": None,
    }


# -- equivalence with the reference's regexes, and safety ---------------------------------------
# ECMAScript WhiteSpace and LineTerminator code points, written out independently of relay.
JS_TRIM = "\t\n\v\f\r \xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"


def _reference_read_tag(xml: str, tag: str) -> str | None:
    """The reference's readTag, transliterated (JS ``s`` flag, JS ``\\s``); it backtracks."""
    ws = f"[{re.escape(JS_TRIM)}]*"
    cdata = re.search(f"<{tag}>{ws}<!\\[CDATA\\[(.*?)\\]\\]>{ws}</{tag}>", xml, re.DOTALL)
    if cdata and cdata.group(1):
        return cdata.group(1).strip(JS_TRIM)
    plain = re.search(f"<{tag}>{ws}([^<]*?){ws}</{tag}>", xml, re.DOTALL)
    if plain and plain.group(1):
        return plain.group(1).strip(JS_TRIM)
    return None


def test_reader_equals_the_reference_regexes_on_random_inputs() -> None:
    rng = random.Random(20240601)
    pieces = ["<Content>", "</Content>", "<![CDATA[", "]]>", " ", "\n", "\ufeff", "\x85", "a", "<", ">", "]", "x y"]
    for _ in range(3000):
        body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert parse_wecom_xml(body)["content"] == _reference_read_tag(body.strip(JS_TRIM), "Content"), body


def test_entity_expansion_payload_is_left_alone() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10))
        + "]><xml><Content>&lol9;</Content></xml>"
    )
    assert parse_wecom_xml(bomb)["content"] == "&lol9;"


@pytest.mark.parametrize(
    "hostile",
    [
        "<Content>" + " " * 200_000,
        "<Content><![CDATA[" * 20_000,
        "<Content><![CDATA[" + "]]> " * 50_000,
        "<Content>\n" * 40_000,
    ],
)
def test_hostile_bodies_are_read_in_linear_time(hostile: str) -> None:
    started = time.perf_counter()
    parse_wecom_xml(hostile)
    assert time.perf_counter() - started < 1.0
