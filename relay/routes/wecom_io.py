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
* Signatures are checked on every form that carries one (reference §13 item 3): a GET with
  ``msg_signature`` but no ``timestamp`` or ``nonce`` is a 400 ``missing_signature_fields``
  (the reference skipped the check), and a plain POST carrying the plaintext-mode
  ``signature`` (SHA-1 of token, timestamp, nonce) is verified. A verified request whose
  ``timestamp`` is further than ``WECOM_TIMESTAMP_TOLERANCE_S`` (default 300 s) from now is
  a 401 ``stale_timestamp``, so a captured request cannot be replayed later.
* With ``CALLBACK_SHARED_SECRET`` set, a POST WeCom did not sign (JSON, form or plain XML
  without a valid signature) must carry the secret in ``x-callback-secret`` (compared in
  constant time), else 401 ``unauthorized_callback`` (reference §13 item 2).
"""
from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional

from relay.ids import valid_id
from relay.jsontext import parse_strict
from relay.lifecycle.types import Ack, InboundMessage
from relay.messages import js_trim, passive_reply_text
from relay.routes.responses import TEXT_CONTENT_TYPE, XML_CONTENT_TYPE, Rendered, json_rendered
from relay.wecom.crypto import (
    WeComCryptoError,
    create_signature,
    decrypt_message,
    encrypt_message,
    verify_plain_signature,
    verify_signature,
)
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
#: The header carrying ``CALLBACK_SHARED_SECRET`` on callbacks WeCom did not sign.
CALLBACK_SECRET_HEADER = "x-callback-secret"
_TIMESTAMP = re.compile(r"\d{1,12}")


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
    callback_secret: Optional[str] = None
    #: Largest accepted distance, in seconds, between a signed request's timestamp and now; 0 = any.
    timestamp_tolerance_s: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> CryptoConfig:
        return cls(
            token=settings.wecom_token,
            aes_key=settings.wecom_encoding_aes_key,
            corp_id=settings.wecom_corp_id,
            passive_reply=settings.wecom_passive_reply,
            callback_secret=settings.callback_secret,
            timestamp_tolerance_s=settings.wecom_timestamp_tolerance_s,
        )

    def fresh(self, timestamp: str, now_s: Optional[int]) -> bool:
        """Whether a signed ``timestamp`` (epoch seconds) is close enough to ``now_s``."""
        if now_s is None or self.timestamp_tolerance_s <= 0:
            return True
        return bool(_TIMESTAMP.fullmatch(timestamp)) and abs(now_s - int(timestamp)) <= self.timestamp_tolerance_s


# -- GET: URL verification -------------------------------------------------------------------


def verify_url(query: Mapping[str, str], config: CryptoConfig, now_s: Optional[int] = None) -> Rendered:
    """Answer WeCom's URL check (§2.11).

    With a token configured, a ``msg_signature`` is checked (timestamp and nonce then required,
    and the timestamp fresh when ``now_s`` is given); without one the check is skipped, as in the
    reference. An echostr that does not decrypt is a 400 ``invalid_echostr`` (the reference
    crashes into a 500).
    """
    echostr = query.get("echostr")
    if not echostr:
        return json_rendered(400, {"error": "missing_echostr"})
    signature, timestamp, nonce = query.get("msg_signature"), query.get("timestamp"), query.get("nonce")
    if config.token and signature:
        if not timestamp or not nonce:
            return json_rendered(400, {"error": "missing_signature_fields"})
        if not verify_signature(config.token, timestamp, nonce, echostr, signature):
            return json_rendered(401, {"error": "invalid_signature"})
        if not config.fresh(timestamp, now_s):
            return json_rendered(401, {"error": "stale_timestamp"})
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
        if isinstance(value, str):
            trimmed = js_trim(value)
            if trimmed:
                return trimmed
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
        payload = parse_strict(plaintext)
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


def inbound_from_body(body: Any, query: Mapping[str, str], config: CryptoConfig,
                      now_s: Optional[int] = None) -> InboundMessage:
    """The callback's message, or ``CallbackRejected`` (400/401) before any gate runs.

    With an ``encrypt`` field the decrypted payload replaces the outer message, reply
    target included, while XML mode stays that of the outer body (§4.3). Its timestamp must
    be fresh when ``now_s`` is given.
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
    if not config.fresh(timestamp, now_s):
        raise CallbackRejected(401, "stale_timestamp")
    try:
        plaintext = decrypt_message(encrypted, config.aes_key)
    except WeComCryptoError:
        raise CallbackRejected(400, "invalid_encrypted_payload") from None
    inner = normalize(read_decrypted_payload(plaintext))
    return replace(inner, xml_mode=outer.xml_mode, encrypted=True)


def check_unsigned_callback(query: Mapping[str, str], presented_secret: Optional[str], config: CryptoConfig,
                            now_s: Optional[int] = None) -> None:
    """Authenticate a POST that is not in the encrypted form; raise ``CallbackRejected``.

    A plaintext-mode ``signature`` in the query is verified (with a token configured) and then
    suffices. Otherwise, with a shared secret configured, ``presented_secret`` must equal it.
    """
    signature = query.get("signature")
    if config.token and signature:
        timestamp, nonce = query.get("timestamp"), query.get("nonce")
        if not timestamp or not nonce:
            raise CallbackRejected(400, "missing_signature_fields")
        if not verify_plain_signature(config.token, timestamp, nonce, signature):
            raise CallbackRejected(401, "invalid_signature")
        if not config.fresh(timestamp, now_s):
            raise CallbackRejected(401, "stale_timestamp")
        return
    if config.callback_secret is None:
        return
    if presented_secret is None or not hmac.compare_digest(
            presented_secret.encode("utf-8", "surrogatepass"), config.callback_secret.encode("utf-8")):
        raise CallbackRejected(401, "unauthorized_callback")


def check_ids(msg: InboundMessage) -> None:
    """The ids a message brings must be valid before they become keys or log fields (``relay.ids``)."""
    if any(value and not valid_id(value) for value in (msg.msg_id, msg.user_id, msg.machine_id)):
        raise CallbackRejected(400, "invalid_id")


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
