"""Reading and writing the few WeCom XML shapes the relay handles (§10.5-§10.7).

Reading is deliberately *not* an XML parser: like the reference's ``parseWeComXml`` it looks for
``<Tag>`` … ``</Tag>`` with a CDATA section or plain text inside. There is no DTD processing and
no entity decoding (``a &amp; b`` stays as written), so entity-expansion attacks ("billion laughs",
external entities) have nothing to act on. The scan is linear in the input size, so a hostile
body cannot make it backtrack either.
"""
from __future__ import annotations

import re
from typing import Optional, Union

from relay.messages import JS_WS_CLASS, js_trim

_WS = f"[{JS_WS_CLASS}]*"
_TAGS = {
    "toUserName": "ToUserName",
    "fromUserName": "FromUserName",
    "createTime": "CreateTime",
    "msgType": "MsgType",
    "content": "Content",
    "msgId": "MsgId",
    "encrypt": "Encrypt",
}
_LOOKS_LIKE_XML = re.compile(f"{_WS}<")


class _TagReader:
    """``readTag`` of the reference, made linear.

    The reference tries ``<T>\\s*<![CDATA[(.*?)]]>\\s*</T>`` and then ``<T>\\s*([^<]*?)\\s*</T>``.
    The first is the first CDATA opener plus the nearest ``]]>\\s*</T>`` after it (a later opener
    can only see a subset of those ends); the second is a ``<T>`` whose text up to the next ``<``
    is followed by ``</T>``, trimmed.
    """

    def __init__(self, tag: str) -> None:
        self.cdata_open = re.compile(f"<{tag}>{_WS}<!\\[CDATA\\[")
        self.cdata_close = re.compile(f"\\]\\]>{_WS}</{tag}>")
        self.plain = re.compile(f"<{tag}>([^<]*)</{tag}>")

    def read(self, xml: str) -> Optional[str]:
        opener = self.cdata_open.search(xml)
        if opener:
            closer = self.cdata_close.search(xml, opener.end())
            if closer and closer.start() > opener.end():
                return js_trim(xml[opener.end():closer.start()])
        plain = self.plain.search(xml)
        if plain:
            return js_trim(plain.group(1)) or None
        return None


_READERS = {key: _TagReader(tag) for key, tag in _TAGS.items()}


def parse_wecom_xml(text: str) -> dict[str, Optional[str]]:
    """The known tags of a WeCom message, keyed as the reference does (``toUserName``,
    ``fromUserName``, ``createTime``, ``msgType``, ``content``, ``msgId``, ``encrypt``); a tag
    that is missing, empty or has attributes is None."""
    xml = js_trim(text)
    return {key: reader.read(xml) for key, reader in _READERS.items()}


def looks_like_xml(text: str) -> bool:
    """Optional whitespace, then ``<``."""
    return bool(_LOOKS_LIKE_XML.match(text))


def from_xml_payload(text: str) -> dict[str, Optional[str]]:
    """The normalised callback fields of an XML body (§4.1): ``encrypt``, ``msgId`` (falling back
    to ``<FromUserName>-<CreateTime>``), ``userId``, ``fromUserName``, ``toUserName`` and ``text``."""
    parsed = parse_wecom_xml(text)
    msg_id = parsed["msgId"]
    if msg_id is None and parsed["fromUserName"] and parsed["createTime"]:
        msg_id = f"{parsed['fromUserName']}-{parsed['createTime']}"
    return {
        "encrypt": parsed["encrypt"],
        "msgId": msg_id,
        "userId": parsed["fromUserName"],
        "fromUserName": parsed["fromUserName"],
        "toUserName": parsed["toUserName"],
        "text": parsed["content"],
    }


def escape_cdata(value: str) -> str:
    """Split every ``]]>`` so the value cannot close its CDATA section."""
    return value.replace("]]>", "]]]]><![CDATA[>")


def escape_text(value: str) -> str:
    """Escape ``&``, ``<`` and ``>`` for a text node."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build_text_reply(to: str, from_: str, content: str, create_time: Union[int, str]) -> str:
    """A plain passive text reply; ``to`` is the inbound FromUserName (the user), ``from_`` the
    inbound ToUserName (the corp), ``create_time`` epoch seconds."""
    return (
        "<xml>"
        f"<ToUserName><![CDATA[{escape_cdata(to)}]]></ToUserName>"
        f"<FromUserName><![CDATA[{escape_cdata(from_)}]]></FromUserName>"
        f"<CreateTime>{escape_text(str(create_time))}</CreateTime>"
        "<MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{escape_cdata(content)}]]></Content>"
        "</xml>"
    )


def build_encrypted_reply(encrypt: str, signature: str, timestamp: Union[int, str], nonce: str) -> str:
    """The encrypted passive reply envelope (§10.6)."""
    return (
        "<xml>"
        f"<Encrypt><![CDATA[{escape_cdata(encrypt)}]]></Encrypt>"
        f"<MsgSignature><![CDATA[{escape_cdata(signature)}]]></MsgSignature>"
        f"<TimeStamp>{escape_text(str(timestamp))}</TimeStamp>"
        f"<Nonce><![CDATA[{escape_cdata(nonce)}]]></Nonce>"
        "</xml>"
    )
