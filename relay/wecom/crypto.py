"""WeCom callback signatures and AES-256-CBC message crypto, byte-compatible with the reference (§10).

Errors are ``WeComCryptoError`` with the reference's messages, so a route can turn them into the
same 500 body the reference sends.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable
from typing import Optional

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.messages import js_trim, utf16_len

AES_KEY_CHARS = 43
_BLOCK = 16
_PAD_BLOCK = 32
_HEADER = 20  # 16 random bytes + uint32 message length

#: The OpenSSL error Node reports for ciphertext that is not a whole number of AES blocks.
WRONG_FINAL_BLOCK_LENGTH_CODE = "ERR_OSSL_WRONG_FINAL_BLOCK_LENGTH"
WRONG_FINAL_BLOCK_LENGTH_MESSAGE = "error:1C80006B:Provider routines::wrong final block length"

_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")
_URL_SAFE = str.maketrans("-_", "+/")


class WeComCryptoError(ValueError):
    """A key, ciphertext or padding the reference would also reject; ``code`` is Node's error
    code when it had one."""

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code


def _utf16_order(value: str) -> bytes:
    return value.encode("utf-16-be", "surrogatepass")


def create_signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    """SHA-1 hex of the four values sorted (JS default sort: UTF-16 code units) and joined."""
    joined = "".join(sorted([token, timestamp, nonce, encrypted], key=_utf16_order))
    return hashlib.sha1(joined.encode("utf-8", "surrogatepass")).hexdigest()


def create_plain_signature(token: str, timestamp: str, nonce: str) -> str:
    """The plaintext-mode ``signature``: SHA-1 hex of token, timestamp and nonce sorted and joined."""
    joined = "".join(sorted([token, timestamp, nonce], key=_utf16_order))
    return hashlib.sha1(joined.encode("utf-8", "surrogatepass")).hexdigest()


def verify_plain_signature(token: str, timestamp: str, nonce: str, signature: str) -> bool:
    """Exact match of a plaintext-mode ``signature``, compared in constant time."""
    expected = create_plain_signature(token, timestamp, nonce)
    return hmac.compare_digest(expected.encode("utf-8"), signature.encode("utf-8", "surrogatepass"))


def verify_signature(token: str, timestamp: str, nonce: str, encrypted: str, signature: str) -> bool:
    """Exact, case-sensitive match of ``signature``, compared in constant time."""
    expected = create_signature(token, timestamp, nonce, encrypted)
    return hmac.compare_digest(expected.encode("utf-8"), signature.encode("utf-8", "surrogatepass"))


def _node_base64_decode(text: str) -> bytes:
    """``Buffer.from(text, "base64")``: URL-safe letters accepted, other characters skipped,
    decoding stops at the first ``=``, and a dangling sixth of a byte is dropped."""
    data = _NOT_BASE64.sub("", text.split("=", 1)[0].translate(_URL_SAFE))
    if len(data) % 4 == 1:
        data = data[:-1]
    return base64.b64decode(data + "=" * (-len(data) % 4))


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key from a 43-character EncodingAESKey (the IV is its first 16 bytes).

    Node would silently skip characters outside the base64 alphabet and then fail on the key
    length; this raises a clear error instead.
    """
    normalized = js_trim(encoding_aes_key)
    if utf16_len(normalized) != AES_KEY_CHARS:
        raise WeComCryptoError("encoding aes key should be 43 chars")
    try:
        key = base64.b64decode(normalized.translate(_URL_SAFE) + "=", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WeComCryptoError("encoding aes key is not valid base64") from exc
    if len(key) != 32:
        raise WeComCryptoError("encoding aes key does not decode to 32 bytes")
    return key


def _cipher(key: bytes) -> Cipher:
    return Cipher(algorithms.AES(key), modes.CBC(key[:_BLOCK]))


def _pkcs7_pad(data: bytes) -> bytes:
    pad = _PAD_BLOCK - len(data) % _PAD_BLOCK
    return data + bytes([pad]) * pad


def _pkcs7_unpad(data: bytes) -> bytes:
    if not data:
        return data
    pad = data[-1]
    if pad < 1 or pad > _PAD_BLOCK:
        raise WeComCryptoError("invalid pkcs7 padding")
    if pad > len(data) or any(byte != pad for byte in data[-pad:]):
        raise WeComCryptoError("invalid pkcs7 padding bytes")
    return data[:-pad]


def encrypt_message(
    message: str,
    encoding_aes_key: str,
    receive_id: str,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> str:
    """Base64 of AES-256-CBC(random16 | len | message | receiveId, PKCS#7 to 32 bytes)."""
    key = decode_aes_key(encoding_aes_key)
    prefix = random_bytes(16)
    if len(prefix) != 16:
        raise WeComCryptoError("random prefix must be 16 bytes")
    body = message.encode("utf-8")
    plain = prefix + struct.pack(">I", len(body)) + body + receive_id.encode("utf-8")
    encryptor = _cipher(key).encryptor()
    encrypted = encryptor.update(_pkcs7_pad(plain)) + encryptor.finalize()
    return base64.b64encode(encrypted).decode("ascii")


def decrypt_message(encrypted_base64: str, encoding_aes_key: str) -> str:
    """The message inside an ``Encrypt`` value or an ``echostr``; the receiveId is not checked."""
    key = decode_aes_key(encoding_aes_key)
    encrypted = _node_base64_decode(encrypted_base64)
    if len(encrypted) % _BLOCK:
        raise WeComCryptoError(WRONG_FINAL_BLOCK_LENGTH_MESSAGE, WRONG_FINAL_BLOCK_LENGTH_CODE)
    decryptor = _cipher(key).decryptor()
    plain = _pkcs7_unpad(decryptor.update(encrypted) + decryptor.finalize())
    if len(plain) < _HEADER:
        raise WeComCryptoError("invalid decrypted payload")
    (length,) = struct.unpack_from(">I", plain, 16)
    end = _HEADER + length
    if end > len(plain):
        raise WeComCryptoError("invalid message length")
    return plain[_HEADER:end].decode("utf-8", "replace")
