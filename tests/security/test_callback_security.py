"""Callback and admin hardening on the real ``create_app`` (memory stores): signatures on every form
that carries one with timestamp freshness, the optional shared secret for unsigned callbacks, ids
checked before they become keys, body limits, safe XML, and the startup warnings (docs/security.md)."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from flask.testing import FlaskClient

from config.settings import load_settings
from relay.app import create_app
from relay.wecom.crypto import create_plain_signature, create_signature, encrypt_message

TOKEN = "wecom-token"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP_ID = "ww-corp"
SECRET = "shared-callback-secret"
NOW_S = 1_795_632_479
ENV = {"ALLOWLIST_USERS": "u1", "MACHINE_BINDINGS": "u1:m1", "WECOM_TOKEN": TOKEN,
       "WECOM_ENCODING_AES_KEY": AES_KEY, "WECOM_CORP_ID": CORP_ID, "RELAY_ADMIN_TOKEN": "admin",
       "RELAY_MAX_BODY_BYTES": "2048"}


class Relay:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        settings = load_settings({**ENV, "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"), **env})
        self.app = create_app(settings, clock=lambda: NOW_S * 1000, start_background=False)
        self.client: FlaskClient = self.app.test_client()

    def close(self) -> None:
        self.app.extensions["relay"].close()


@pytest.fixture
def make_relay(tmp_path: Path) -> Iterator[Any]:
    relays: list[Relay] = []

    def make(**env: str) -> Relay:
        relays.append(Relay(tmp_path, **env))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def answer(response: Any) -> tuple[int, Any]:
    return response.status_code, response.get_json(silent=True)


def message(**fields: str) -> dict[str, str]:
    return {"msgId": uuid.uuid4().hex, "userId": "u1", "text": "@dev task fix it", **fields}


def encrypted(timestamp: str, inner: str = "<xml><FromUserName>u1</FromUserName><Content>hi</Content>"
              "<MsgId>e-1</MsgId></xml>") -> tuple[str, str]:
    cipher = encrypt_message(inner, AES_KEY, CORP_ID)
    body = f"<xml><Encrypt><![CDATA[{cipher}]]></Encrypt></xml>"
    return body, urlencode({"msg_signature": create_signature(TOKEN, timestamp, "n", cipher),
                            "timestamp": timestamp, "nonce": "n"})


# -- signatures and freshness -----------------------------------------------------------------------
def test_encrypted_callback_with_a_stale_timestamp_is_refused(make_relay: Any) -> None:
    relay = make_relay()
    body, query = encrypted(str(NOW_S - 301))
    assert answer(relay.client.post(f"/wecom/callback?{query}", data=body, content_type="application/xml")) == (
        401, {"error": "stale_timestamp"})
    body, query = encrypted(str(NOW_S - 299))
    assert relay.client.post(f"/wecom/callback?{query}", data=body, content_type="application/xml").status_code == 200


def test_freshness_can_be_turned_off(make_relay: Any) -> None:
    relay = make_relay(WECOM_TIMESTAMP_TOLERANCE_S="0")
    body, query = encrypted("1")
    assert relay.client.post(f"/wecom/callback?{query}", data=body, content_type="application/xml").status_code == 200


def test_verification_with_a_signature_checks_it_whole(make_relay: Any) -> None:
    relay = make_relay()
    echostr = encrypt_message("echo", AES_KEY, CORP_ID)
    fresh = str(NOW_S)
    signed = {"msg_signature": create_signature(TOKEN, fresh, "n", echostr), "timestamp": fresh, "nonce": "n",
              "echostr": echostr}
    assert relay.client.get(f"/wecom/callback?{urlencode(signed)}").get_data(as_text=True) == "echo"
    assert answer(relay.client.get(f"/wecom/callback?{urlencode({**signed, 'nonce': 'other'})}")) == (
        401, {"error": "invalid_signature"})
    partial = {k: v for k, v in signed.items() if k != "timestamp"}
    assert answer(relay.client.get(f"/wecom/callback?{urlencode(partial)}")) == (
        400, {"error": "missing_signature_fields"})
    stale = str(NOW_S - 3600)
    old = {**signed, "timestamp": stale, "msg_signature": create_signature(TOKEN, stale, "n", echostr)}
    assert answer(relay.client.get(f"/wecom/callback?{urlencode(old)}")) == (401, {"error": "stale_timestamp"})


def test_plaintext_signature_on_a_plain_post_is_checked(make_relay: Any) -> None:
    relay = make_relay()
    fresh = str(NOW_S)
    good = urlencode({"signature": create_plain_signature(TOKEN, fresh, "n"), "timestamp": fresh, "nonce": "n"})
    assert answer(relay.client.post(f"/wecom/callback?{good}", json=message()))[1]["status"] == "machine_offline"
    bad = urlencode({"signature": "0" * 40, "timestamp": fresh, "nonce": "n"})
    assert answer(relay.client.post(f"/wecom/callback?{bad}", json=message())) == (401, {"error": "invalid_signature"})


# -- shared secret ----------------------------------------------------------------------------------
def test_unsigned_callbacks_need_the_shared_secret_when_one_is_set(make_relay: Any) -> None:
    relay = make_relay(CALLBACK_SHARED_SECRET=SECRET)
    assert answer(relay.client.post("/wecom/callback", json=message())) == (401, {"error": "unauthorized_callback"})
    wrong = {"x-callback-secret": SECRET + "x"}
    assert answer(relay.client.post("/wecom/callback", json=message(), headers=wrong))[0] == 401
    plain_xml = "<xml><FromUserName>u1</FromUserName><Content>@dev task x</Content><MsgId>x-1</MsgId></xml>"
    assert relay.client.post("/wecom/callback", data=plain_xml, content_type="application/xml").status_code == 401
    ok = relay.client.post("/wecom/callback", json=message(), headers={"x-callback-secret": SECRET})
    assert answer(ok)[1]["status"] == "machine_offline"
    body, query = encrypted(str(NOW_S))  # WeCom's own signature is enough
    assert relay.client.post(f"/wecom/callback?{query}", data=body, content_type="application/xml").status_code == 200


def test_without_a_shared_secret_json_callbacks_work_as_before(make_relay: Any) -> None:
    assert answer(make_relay().client.post("/wecom/callback", json=message()))[1]["status"] == "machine_offline"


# -- ids, body size, XML ------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["msgId", "userId", "machineId"])
@pytest.mark.parametrize("value", ["x" * 129, "line\nbreak", "zero\u200bwidth", "bidi\u202eflip", "nul\x00"])
def test_ids_are_checked_before_they_become_keys(make_relay: Any, field: str, value: str) -> None:
    relay = make_relay()
    assert answer(relay.client.post("/wecom/callback", json=message(**{field: value}))) == (
        400, {"error": "invalid_id"})


def test_ids_of_any_script_are_fine(make_relay: Any) -> None:
    relay = make_relay(ALLOWLIST_USERS="张三", MACHINE_BINDINGS="")
    reply = relay.client.post("/wecom/callback", json=message(userId="张三", machineId="开发机-1"))
    assert answer(reply)[1]["status"] == "machine_offline"


def test_bodies_over_the_limit_are_413(make_relay: Any) -> None:
    relay = make_relay()
    big = {**message(), "text": "x" * 4096}
    assert relay.client.post("/wecom/callback", json=big).status_code == 413
    assert relay.client.put("/ops/store/flags", json={"STORE_PHASE": "x" * 4096},
                            headers={"x-admin-token": "admin"}).status_code == 413


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                    for i in range(1, 10))
          + ']><xml><FromUserName>u1</FromUserName><Content>@dev task &lol9;</Content><MsgId>l-1</MsgId></xml>')
XXE = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       '<xml><FromUserName>u1</FromUserName><Content>@dev task &xxe;</Content><MsgId>x-2</MsgId></xml>')


@pytest.mark.parametrize("body", [LAUGHS, XXE], ids=["billion-laughs", "external-entity"])
def test_xml_entities_are_never_expanded(make_relay: Any, body: str, tmp_path: Path) -> None:
    relay = make_relay(RELAY_MAX_BODY_BYTES="65536", WECOM_PASSIVE_REPLY="off")
    assert relay.client.post("/wecom/callback", data=body, content_type="application/xml").status_code == 200
    audit = (tmp_path / "audit.jsonl").read_text()
    assert "root:" not in audit and "lollollol" not in audit
    assert ("&lol9;" in audit) or ("&xxe;" in audit)


# -- startup warnings -----------------------------------------------------------------------------------
class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(getattr(record, "event", ""))


@pytest.mark.parametrize(("env", "expected"), [
    ({"RELAY_ADMIN_TOKEN": ""}, {"admin_open", "agent_auth_off"}),
    ({"AGENT_AUTH_TOKEN": "t"}, set()),
    ({"AGENT_TOKENS": "m1:t"}, set()),
])
def test_startup_warns_about_open_admin_routes_and_agent_channel(
        make_relay: Any, env: dict[str, str], expected: set[str]) -> None:
    captured = Captured()
    logger = logging.getLogger("relay.app")
    logger.addHandler(captured)
    try:
        make_relay(**env)
    finally:
        logger.removeHandler(captured)
    assert {"admin_open", "agent_auth_off"} & set(captured.events) == expected
