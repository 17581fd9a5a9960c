"""The WeCom callback's wire formats, as pure functions (reference §2.11, §4.1-4.3, §4.8).

``verify_url`` answers the GET URL verification, ``inbound_from_body`` turns a parsed POST
body and its query into an ``InboundMessage``, and ``render_ack`` turns the lifecycle's
``Ack`` into JSON, passive XML, ``success`` or an encrypted passive reply. None of them
needs Flask or a request, so every rule is unit-tested directly.

Deliberate changes from the reference:

* A ciphertext that does not decrypt (bad base64 or length, bad padding) is a clean 400,
  ``{"error":"invalid_echostr"}`` on GET and ``{"error":"invalid_encrypted_payload"}`` on
  POST, instead of Fastify's 500 carrying the OpenSSL message.
* The reference takes values of the nested ``message`` object, and of a decrypted JSON
  payload, without looking at their type, so a number or an object there flows into the
  gates and the audit as it is. Here a field that is neither a string nor null makes the
  request a 400 ``invalid_payload``.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional

from relay.lifecycle.types import Ack, InboundMessage
from relay.messages import js_trim, passive_reply_text
from relay.routes.body import parse_json_text
from relay.routes.responses import TEXT_CONTENT_TYPE, XML_CONTENT_TYPE, Rendered, json_rendered
from relay.wecom.crypto import WeComCryptoError, create_signature, decrypt_message, encrypt_message, verify_signature
from relay.wecom.xml import build_encrypted_reply, build_text_reply, from_xml_payload, looks_like_xml

#: Dict fields that may carry a whole XML message (form posts), in the order they are tried.
XML_FIELDS = ("xml", "XML", "payload", "body")
#: Top-level aliases of a JSON or form body, first non-empty trimmed string wins (§4.1).
ALIASES: Mapping[str, tuple[str, ...]] = {
    "msgId": ("msgId", "MsgId"),
    "userId": ("userId", "UserId"),
    "machineId": ("machineId", "MachineId"),
    "text": ("text", "Text", "content", "Content"),
    "fromUserName": ("fromUserName", "FromUserName"),
    "toUserName": ("toUserName", "ToUserName"),
    "encrypt": ("encrypt", "Encrypt"),
}
#: The only fields read from a decrypted JSON payload (no aliases, §4.3 step 5).
DECRYPTED_FIELDS = ("msgId", "userId", "machineId", "text", "fromUserName", "toUserName")


class CallbackRejected(Exception):
    """The callback is refused before the lifecycle runs: ``{"error": error}`` with ``http_status``."""

    def __init__(self, http_status: int, error: str) -> None:
        super().__init__(error)
        self.http_status = http_status
        self.error = error

    def rendered(self) -> Rendered:
        return json_rendered(self.http_status, {"error": self.error})


@dataclass(frozen=True)
class CallbackFields:
    """One callback body as the reference reads it, before normalising.

    ``fields`` maps the reference's names (msgId, userId, machineId, text, fromUserName,
    toUserName, encrypt) to their values; ``message`` is the nested object, if any.
    """

    fields: Mapping[str, Any]
    message: Optional[Mapping[str, Any]] = None
    xml_mode: bool = False

    @property
    def encrypt(self) -> Optional[str]:
        value = self.fields.get("encrypt")
        return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class CryptoConfig:
    """The WeCom secrets the callback uses; ``None`` means not configured."""

    token: Optional[str] = None
    aes_key: Optional[str] = None
    corp_id: Optional[str] = None
    passive_reply: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> CryptoConfig:
        return cls(
            token=settings.wecom_token,
            aes_key=settings.wecom_encoding_aes_key,
            corp_id=settings.wecom_corp_id,
            passive_reply=settings.wecom_passive_reply,
        )


# -- GET: URL verification -------------------------------------------------------------------


def verify_url(query: Mapping[str, str], config: CryptoConfig) -> Rendered:
    """Answer WeCom's URL check (§2.11).

    The signature is only checked when a token is configured and msg_signature, timestamp
    and nonce are all present, as in the reference. An echostr that does not decrypt is a
    400 ``invalid_echostr`` (the reference crashes into a 500).
    """
    echostr = query.get("echostr")
    if not echostr:
        return json_rendered(400, {"error": "missing_echostr"})
    signature, timestamp, nonce = query.get("msg_signature"), query.get("timestamp"), query.get("nonce")
    if config.token and signature and timestamp and nonce:
        if not verify_signature(config.token, timestamp, nonce, echostr, signature):
            return json_rendered(401, {"error": "invalid_signature"})
    if config.aes_key:
        try:
            return Rendered(200, TEXT_CONTENT_TYPE, decrypt_message(echostr, config.aes_key))
        except WeComCryptoError:
            return json_rendered(400, {"error": "invalid_echostr"})
    return Rendered(200, TEXT_CONTENT_TYPE, echostr)


# -- POST: body → InboundMessage -------------------------------------------------------------


def _first_text(body: Mapping[str, Any], names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        value = body.get(name)
        if isinstance(value, str) and js_trim(value):
            return js_trim(value)
    return None


def _xml_fields(text: str) -> CallbackFields:
    return CallbackFields(fields=from_xml_payload(text), xml_mode=True)


def read_callback_body(body: Any) -> CallbackFields:
    """§4.1: a string is WeCom XML; a dict is an XML carrier or aliased fields; else nothing.

    XML mode is on for a string body, for a dict whose first non-empty ``xml``/``XML``/
    ``payload``/``body`` field looks like XML, and for a dict with both user names.
    """
    if isinstance(body, str):
        return _xml_fields(body)
    if not isinstance(body, dict):
        return CallbackFields(fields={})
    carrier = _first_text(body, XML_FIELDS)
    if carrier is not None and looks_like_xml(carrier):
        return _xml_fields(carrier)
    fields = {name: _first_text(body, aliases) for name, aliases in ALIASES.items()}
    message = body.get("message")
    return CallbackFields(
        fields=fields,
        message=message if isinstance(message, dict) else None,
        xml_mode=bool(fields["fromUserName"] and fields["toUserName"]),
    )


def read_decrypted_payload(plaintext: str) -> CallbackFields:
    """§4.3 steps 4-5: decrypted XML, or JSON read without aliases; else 400."""
    if looks_like_xml(plaintext):
        return _xml_fields(plaintext)
    try:
        payload = parse_json_text(plaintext)
    except ValueError:
        raise CallbackRejected(400, "invalid_decrypted_payload") from None
    if not isinstance(payload, dict):
        return CallbackFields(fields={})
    message = payload.get("message")
    return CallbackFields(
        fields={name: payload.get(name) for name in DECRYPTED_FIELDS},
        message=message if isinstance(message, dict) else None,
    )


def _text_or_none(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise CallbackRejected(400, "invalid_payload")


def _pick(source: CallbackFields, name: str) -> Optional[str]:
    """``message[name] ?? fields[name]``: only null or a missing key falls through."""
    if source.message is not None and source.message.get(name) is not None:
        return _text_or_none(source.message[name])
    return _text_or_none(source.fields.get(name))


def normalize(source: CallbackFields) -> InboundMessage:
    """§4.2: the nested ``message`` wins field by field; userId falls back to the reply target."""
    reply_to = _pick(source, "fromUserName")
    user_id = _pick(source, "userId")
    return InboundMessage(
        msg_id=_pick(source, "msgId"),
        user_id=user_id if user_id is not None else reply_to,
        machine_id=_pick(source, "machineId"),
        text=_pick(source, "text"),
        reply_to=reply_to,
        reply_from=_pick(source, "toUserName"),
        xml_mode=source.xml_mode,
    )


def inbound_from_body(body: Any, query: Mapping[str, str], config: CryptoConfig) -> InboundMessage:
    """The callback's message, or ``CallbackRejected`` (400/401) before any gate runs.

    With an ``encrypt`` field the decrypted payload replaces the outer message, reply
    target included, while XML mode stays that of the outer body (§4.3).
    """
    outer = read_callback_body(body)
    encrypted = outer.encrypt
    if encrypted is None:
        return normalize(outer)
    if not config.token or not config.aes_key:
        raise CallbackRejected(400, "missing_wecom_crypto_config")
    signature, timestamp, nonce = query.get("msg_signature"), query.get("timestamp"), query.get("nonce")
    if not signature or not timestamp or not nonce:
        raise CallbackRejected(400, "missing_signature_fields")
    if not verify_signature(config.token, timestamp, nonce, encrypted, signature):
        raise CallbackRejected(401, "invalid_signature")
    try:
        plaintext = decrypt_message(encrypted, config.aes_key)
    except WeComCryptoError:
        raise CallbackRejected(400, "invalid_encrypted_payload") from None
    inner = normalize(read_decrypted_payload(plaintext))
    return replace(inner, xml_mode=outer.xml_mode, encrypted=True)


# -- the ack ---------------------------------------------------------------------------------


def passive_reply_xml(payload: Mapping[str, Any], msg: InboundMessage, config: CryptoConfig, create_time: int) -> Optional[str]:
    """The plain passive text reply of §4.8, or ``None`` when there is none to send."""
    if not config.passive_reply or not msg.reply_to or not msg.reply_from:
        return None
    status = payload.get("status")
    passive_message = payload.get("passiveMessage")
    if isinstance(passive_message, str) and passive_message:
        content = passive_message
    elif status == "sent_to_agent":
        return None
    else:
        content = passive_reply_text(str(status), payload.get("locale"))
    return build_text_reply(msg.reply_to, msg.reply_from, content, create_time)


def reply_nonce(random_bytes: Callable[[int], bytes]) -> str:
    """The first 16 hex digits of a dash-less UUID v4 drawn from ``random_bytes``."""
    return uuid.UUID(bytes=random_bytes(16), version=4).hex[:16]


def render_ack(
    ack: Ack,
    msg: InboundMessage,
    config: CryptoConfig,
    now_ms: int,
    random_bytes: Callable[[int], bytes],
) -> Rendered:
    """§4.8: errors as JSON; XML-mode acks as (encrypted) passive XML or ``success``; else JSON.

    ``random_bytes`` supplies the nonce's UUID and then the ciphertext's 16-byte prefix.
    """
    if not ack.ok or not msg.xml_mode:
        return json_rendered(ack.http_status, ack.payload)
    seconds = now_ms // 1000
    reply = passive_reply_xml(ack.payload, msg, config, seconds)
    if not msg.encrypted:
        if reply is None:
            return Rendered(200, TEXT_CONTENT_TYPE, "success")
        return Rendered(200, XML_CONTENT_TYPE, reply)
    if not config.token or not config.aes_key or not config.corp_id:
        return json_rendered(500, {"error": "missing_wecom_encrypted_reply_config"})
    timestamp = str(seconds)
    nonce = reply_nonce(random_bytes)
    encrypted = encrypt_message(reply if reply is not None else "success", config.aes_key, config.corp_id, random_bytes)
    signature = create_signature(config.token, timestamp, nonce, encrypted)
    return Rendered(200, XML_CONTENT_TYPE, build_encrypted_reply(encrypted, signature, timestamp, nonce))
