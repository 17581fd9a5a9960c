"""WeCom signature and AES message crypto: the vectors of §10.1, §10.2 and §10.4, the wecom.test.ts
round trip (§12), the encrypted reply of http_probe_transcript.txt, and every decrypt error."""
from __future__ import annotations

import base64
import hashlib
import re
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.wecom.crypto import (
    WRONG_FINAL_BLOCK_LENGTH_CODE,
    WRONG_FINAL_BLOCK_LENGTH_MESSAGE,
    WeComCryptoError,
    create_signature,
    decode_aes_key,
    decrypt_message,
    encrypt_message,
    verify_signature,
)

VECTOR_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
TEST_KEY = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"  # base64 of 32 bytes of 0x07, cut to 43 chars
DETERMINISTIC_MESSAGE = "<xml><Content><![CDATA[你好]]></Content></xml>"
DETERMINISTIC_CIPHERTEXT = (
    "Q3stYC6hdFzMh9T8HCvyDMwQK6xyeRZ7UnuZsYfP7/6Yf0piNuk7kxZYuxJFeZQQ6WWSSAGv9ZFJIKURndrGswiiPBEloTZX"
    "26Gr3A17Bn4FvUlR9H5YqIhWJz1IiXvR"
)
TRANSCRIPT = Path(__file__).resolve().parents[1] / "vectors" / "http_probe_transcript.txt"


def _fixed_random(size: int) -> bytes:
    assert size == 16
    return b"0123456789abcdef"


def _raw_encrypt(plain: bytes, key_text: str = VECTOR_KEY) -> str:
    """AES-256-CBC without any padding, for building malformed ciphertexts."""
    key = decode_aes_key(key_text)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()


# -- signature (§10.1, wecom.test.ts) ---------------------------------------------------------
def test_signature_vector() -> None:
    assert (
        create_signature("token1", "1700000000", "nonce1", "encrypted-body")
        == "5049510d7e04c67f04fc9d5e1ede1bf91de20896"
    )


def test_signature_is_sha1_of_sorted_joined_values() -> None:
    values = ["token1", "1700000000", "nonce1", "encrypted-body"]
    assert create_signature(*values) == hashlib.sha1("".join(sorted(values)).encode()).hexdigest()


def test_signature_sorts_by_utf16_code_units_like_js() -> None:
    # U+FFFF sorts after U+1F600 in JS (0xFFFF > 0xD83D) but before it by code point.
    values = ["\uffff", "\U0001f600", "a", "b"]
    js_order = "a" + "b" + "\U0001f600" + "\uffff"
    assert create_signature(*values) == hashlib.sha1(js_order.encode()).hexdigest()


def test_verify_signature() -> None:
    args = ("token1", "1700000000", "nonce1", "encrypted-body")
    assert verify_signature(*args, "5049510d7e04c67f04fc9d5e1ede1bf91de20896") is True
    assert verify_signature(*args, "bad") is False
    assert verify_signature(*args, "5049510D7E04C67F04FC9D5E1EDE1BF91DE20896") is False
    assert verify_signature(*args, "") is False
    assert verify_signature(*args, "签名") is False


# -- key (§10.2) ------------------------------------------------------------------------------
def test_key_vector() -> None:
    key = decode_aes_key(VECTOR_KEY)
    assert key.hex() == "69b71d79f8218a39259a7a29aabb2dbafc31cb3d35db7e39ebbf3d0010831051"


def test_key_is_trimmed_js_style() -> None:
    assert decode_aes_key(f"\ufeff {VECTOR_KEY}\n") == decode_aes_key(VECTOR_KEY)


@pytest.mark.parametrize("key", ["", VECTOR_KEY[:-1], VECTOR_KEY + "H", "\x85" + VECTOR_KEY])
def test_key_must_be_43_chars(key: str) -> None:
    with pytest.raises(WeComCryptoError, match="^encoding aes key should be 43 chars$"):
        decode_aes_key(key)


def test_key_accepts_url_safe_alphabet_like_node() -> None:
    standard = "+/" + VECTOR_KEY[2:]
    assert decode_aes_key("-_" + VECTOR_KEY[2:]) == decode_aes_key(standard)


def test_key_with_invalid_characters_is_rejected() -> None:
    with pytest.raises(WeComCryptoError, match="not valid base64"):
        decode_aes_key("!" + VECTOR_KEY[1:])


def test_key_with_early_padding_is_rejected() -> None:
    with pytest.raises(WeComCryptoError, match="does not decode to 32 bytes"):
        decode_aes_key(VECTOR_KEY[:-1] + "=")


# -- encrypt and decrypt (§10.3, §10.4) --------------------------------------------------------
def test_deterministic_encrypt_vector() -> None:
    ciphertext = encrypt_message(DETERMINISTIC_MESSAGE, VECTOR_KEY, "wx5823bf96d3bd56c7", random_bytes=_fixed_random)
    assert ciphertext == DETERMINISTIC_CIPHERTEXT
    assert len(base64.b64decode(ciphertext)) == 96  # 16 + 4 + 48 + 18 = 86, padded by 10


def test_deterministic_decrypt_vector() -> None:
    assert decrypt_message(DETERMINISTIC_CIPHERTEXT, VECTOR_KEY) == DETERMINISTIC_MESSAGE


def test_round_trip_of_wecom_test_ts() -> None:
    encrypted = encrypt_message("success", TEST_KEY, "ww123456")
    assert decrypt_message(encrypted, TEST_KEY) == "success"


def test_encrypt_uses_fresh_random_by_default() -> None:
    assert encrypt_message("success", TEST_KEY, "ww123456") != encrypt_message("success", TEST_KEY, "ww123456")


def test_aligned_plaintext_gets_a_full_block_of_padding() -> None:
    # 16 + 4 + 8 + 4 = 32 bytes: already aligned, so 32 bytes of 0x20 are added.
    ciphertext = base64.b64decode(encrypt_message("12345678", TEST_KEY, "abcd", random_bytes=_fixed_random))
    assert len(ciphertext) == 64
    key = decode_aes_key(TEST_KEY)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    plain = decryptor.update(ciphertext) + decryptor.finalize()
    assert plain == b"0123456789abcdef" + struct.pack(">I", 8) + b"12345678abcd" + b"\x20" * 32


def test_receive_id_is_not_checked_on_decrypt() -> None:
    assert decrypt_message(encrypt_message("hi", TEST_KEY, "someone-else"), TEST_KEY) == "hi"


def test_decrypt_is_lenient_about_base64_like_node() -> None:
    ciphertext = DETERMINISTIC_CIPHERTEXT
    spaced = " ".join(ciphertext[i : i + 10] for i in range(0, len(ciphertext), 10))
    url_safe = ciphertext.replace("+", "-").replace("/", "_")
    assert decrypt_message(spaced, VECTOR_KEY) == DETERMINISTIC_MESSAGE
    assert decrypt_message(url_safe, VECTOR_KEY) == DETERMINISTIC_MESSAGE


def test_transcript_encrypted_reply_decrypts_to_the_recorded_plaintext() -> None:
    transcript = TRANSCRIPT.read_text(encoding="utf-8")
    encrypted = re.search(r"<Encrypt><!\[CDATA\[([^\]]+)\]\]></Encrypt>", transcript).group(1)
    expected = re.search(r"^decrypted reply: (.*)$", transcript, re.MULTILINE).group(1)
    assert decrypt_message(encrypted, TEST_KEY) == expected


# -- decrypt errors ---------------------------------------------------------------------------
def test_wrong_block_length_reports_nodes_error() -> None:
    with pytest.raises(WeComCryptoError) as caught:
        decrypt_message(base64.b64encode(b"x" * 17).decode(), VECTOR_KEY)
    assert str(caught.value) == WRONG_FINAL_BLOCK_LENGTH_MESSAGE
    assert caught.value.code == WRONG_FINAL_BLOCK_LENGTH_CODE


@pytest.mark.parametrize("pad", [0, 33])
def test_pad_byte_out_of_range(pad: int) -> None:
    with pytest.raises(WeComCryptoError, match="^invalid pkcs7 padding$") as caught:
        decrypt_message(_raw_encrypt(b"a" * 31 + bytes([pad])), VECTOR_KEY)
    assert caught.value.code is None


@pytest.mark.parametrize("plain", [b"a" * 30 + b"\x01\x02", b"a" * 16 + b"\x20" * 16])
def test_inconsistent_pad_bytes(plain: bytes) -> None:
    with pytest.raises(WeComCryptoError, match="^invalid pkcs7 padding bytes$"):
        decrypt_message(_raw_encrypt(plain), VECTOR_KEY)


@pytest.mark.parametrize("ciphertext", ["", "====", None])
def test_short_plaintext(ciphertext: str | None) -> None:
    value = ciphertext if ciphertext is not None else _raw_encrypt(b"a" * 16 + b"\x10" * 16)
    with pytest.raises(WeComCryptoError, match="^invalid decrypted payload$"):
        decrypt_message(value, VECTOR_KEY)


def test_message_length_beyond_the_plaintext() -> None:
    plain = b"r" * 16 + struct.pack(">I", 100) + b"hello" + b"\x07" * 7
    with pytest.raises(WeComCryptoError, match="^invalid message length$"):
        decrypt_message(_raw_encrypt(plain), VECTOR_KEY)


def test_crypto_errors_are_value_errors() -> None:
    assert issubclass(WeComCryptoError, ValueError)
    with pytest.raises(ValueError):
        decrypt_message("abc", "short")
