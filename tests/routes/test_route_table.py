"""The HTTP routes end to end on the real ``create_app`` (memory stores): reference §2.0-2.14,
every row of the §2.12 table, and a replay of the golden HTTP transcript.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode

import pytest
from flask.testing import FlaskClient

from config.settings import load_settings
from relay.app import create_app
from relay.wecom.crypto import create_signature, decrypt_message, encrypt_message

JSON_CT = "application/json; charset=utf-8"
TOKEN = "token1"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP_ID = "ww123456"
ADMIN = "probe-admin-token"
START_MS = 1795632479000
TRANSCRIPT = Path(__file__).resolve().parents[1] / "vectors" / "http_probe_transcript.txt"
PROBE_ENV = {
    "ALLOWLIST_USERS": "u1,zhangsan",
    "MACHINE_BINDINGS": "u1:dev-machine-1,zhangsan:dev-machine-1",
    "WECOM_TOKEN": TOKEN,
    "WECOM_ENCODING_AES_KEY": AES_KEY,
    "WECOM_CORP_ID": CORP_ID,
    "RELAY_ADMIN_TOKEN": ADMIN,
}


class Clock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


class NullWebhook:
    def post(self, payload: dict[str, Any]) -> None:
        """Results are not pushed anywhere in these tests."""


class FakeAgent:
    """Stands in for an agent socket; the channel itself is tested elsewhere."""

    def __init__(self) -> None:
        self.session_id = str(uuid.uuid4())
        self.machine_id: Optional[str] = None
        self.frames: list[dict[str, Any]] = []

    def send_json(self, frame: dict[str, Any]) -> bool:
        self.frames.append(frame)
        return True

    def close(self, reason: str = "") -> None:
        """Nothing to close."""


def seeded_random() -> Callable[[int], bytes]:
    counter = iter(range(1 << 30))

    def random_bytes(n: int) -> bytes:
        seed = next(counter)
        return bytes((seed * 7 + i) % 256 for i in range(n))

    return random_bytes


class Relay:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        settings = load_settings({**PROBE_ENV, "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"), **env})
        self.clock = Clock()
        self.app = create_app(settings, clock=self.clock, crypto_random=seeded_random(), webhook=NullWebhook(),
                              start_background=False)
        self.relay = self.app.extensions["relay"]
        self.client: FlaskClient = self.app.test_client()

    def close(self) -> None:
        self.relay.close()

    def admin(self, method: str, path: str, headers: Optional[dict[str, str]] = None, **kwargs: Any) -> Any:
        return self.client.open(path, method=method, headers={"x-admin-token": ADMIN, **(headers or {})}, **kwargs)

    def connect(self, machine_id: str = "dev-machine-1", running: int = 0, pending: int = 0) -> FakeAgent:
        agent = FakeAgent()
        events = self.relay.agent_events
        with self.relay.router.bound():
            events.on_hello(agent, {"type": "agent.hello", "machineId": machine_id})
            events.on_heartbeat(agent, {"type": "agent.heartbeat", "machineId": machine_id,
                                        "runningCount": running, "pendingCount": pending})
        return agent

    def result(self, agent: FakeAgent, command_id: str, summary: str = "done", status: str = "ok") -> None:
        frame = {"type": "agent.result", "result": {"commandId": command_id, "machineId": agent.machine_id,
                                                    "status": status, "summary": summary,
                                                    "createdAt": "2026-11-25T18:48:00.000Z"}}
        with self.relay.router.bound():
            self.relay.agent_events.on_result(agent, frame)

    def disconnect(self, agent: FakeAgent) -> None:
        with self.relay.router.bound():
            self.relay.agent_events.on_disconnect(agent)


@pytest.fixture
def make_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    built: list[Relay] = []

    def build(**env: str) -> Relay:
        relay = Relay(tmp_path, **env)
        built.append(relay)
        return relay

    yield build
    for relay in built:
        relay.close()


@pytest.fixture
def relay(make_relay: Callable[..., Relay]) -> Relay:
    return make_relay()


def reply(response: Any) -> tuple[int, str, str]:
    return response.status_code, response.headers["Content-Type"], response.get_data(as_text=True)


def error(status: int, code: str) -> tuple[int, str, str]:
    return status, JSON_CT, json.dumps({"error": code}, separators=(",", ":"))


def wecom_xml(from_user: str = "u1", to_user: str = "corp", content: str = "hello", msg_id: str = "") -> str:
    msg_id = msg_id or uuid.uuid4().hex
    return (f"<xml><ToUserName><![CDATA[{to_user}]]></ToUserName><FromUserName><![CDATA[{from_user}]]></FromUserName>"
            f"<CreateTime>1795632479</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId><AgentID>1000002</AgentID></xml>")


def envelope(inner: str) -> tuple[str, str]:
    """An encrypted callback body and its signed query string."""
    encrypted = encrypt_message(inner, AES_KEY, CORP_ID)
    body = f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    query = urlencode({"msg_signature": create_signature(TOKEN, "1795632479", "nonce1", encrypted),
                       "timestamp": "1795632479", "nonce": "nonce1"})
    return body, query


def post_json(relay: Relay, body: Any, path: str = "/wecom/callback") -> Any:
    return relay.client.post(path, json=body)


def message(text: str, user_id: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"msgId": uuid.uuid4().hex, "userId": user_id, "text": text, **extra}


# -- §2.0 admin authentication, §2.1 health ---------------------------------------------------------

ADMIN_ROUTES = [("GET", "/metrics"), ("GET", "/ops/config"), ("GET", "/machines"), ("GET", "/inflight"),
                ("GET", "/commands/x"), ("GET", "/audit/recent"), ("POST", "/commands/x/cancel"),
                ("POST", "/commands/x/retry")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"x-admin-token": "wrong"}])
def test_admin_routes_need_the_token(relay: Relay, method: str, path: str, headers: dict[str, str]) -> None:
    assert reply(relay.client.open(path, method=method, headers=headers)) == error(401, "unauthorized_admin_request")


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_accept_the_token(relay: Relay, method: str, path: str) -> None:
    assert relay.admin(method, path).status_code != 401


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_are_open_without_a_configured_token(make_relay: Callable[..., Relay], method: str, path: str) -> None:
    relay = make_relay(RELAY_ADMIN_TOKEN="__SET_IN_USER_ENV__")
    assert relay.client.open(path, method=method).status_code != 401


def test_healthz_needs_no_token(relay: Relay) -> None:
    assert reply(relay.client.get("/healthz")) == (200, JSON_CT, '{"status":"ok"}')


# -- §2.2-2.9 ops routes ------------------------------------------------------------------------------


def test_metrics_shape(relay: Relay) -> None:
    body = relay.admin("GET", "/metrics").get_json()
    assert list(body) == ["machines", "inflight", "audit", "store"]
    assert list(body["machines"]) == ["totalConnected", "stale"]
    assert list(body["store"]) == ["mode", "degraded", "redisErrorCount", "domains"]
    audit = body["store"]["domains"]["audit"]
    assert audit["phase"] == "memory" and {"p50Ms", "p95Ms", "p99Ms", "errorRate", "timeoutRate",
                                           "fallbackRate", "mismatchRate"} <= set(audit)


def test_ops_config_shape(relay: Relay) -> None:
    response = relay.admin("GET", "/ops/config")
    assert response.headers["Content-Type"] == JSON_CT
    body = response.get_json()
    assert list(body) == ["relay", "wecom", "audit", "store"]
    assert list(body["wecom"]) == ["tokenConfigured", "aesKeyConfigured", "corpIdConfigured", "agentSecretConfigured",
                                   "agentIdConfigured", "callbackPath", "callbackRoutes"]
    assert body["wecom"]["callbackRoutes"] == ["/wecom/callback"]


def test_machines_and_inflight_list_connected_agents_and_commands(relay: Relay) -> None:
    relay.connect(running=1, pending=2)
    sent = post_json(relay, message("@dev fix it")).get_json()
    machines = relay.admin("GET", "/machines").get_json()["items"]
    assert [(m["machineId"], m["stale"], m["runningCount"], m["pendingCount"]) for m in machines] == [
        ("dev-machine-1", False, 1, 2)]
    inflight = relay.admin("GET", "/inflight").get_json()["items"]
    assert [(i["commandId"], i["kind"]) for i in inflight] == [(sent["commandId"], "task")]


def test_command_record_and_unknown_command(relay: Relay) -> None:
    offline = post_json(relay, message("hello")).get_json()
    record = relay.admin("GET", f"/commands/{offline['commandId']}").get_json()
    assert record["commandId"] == offline["commandId"]
    assert [e["status"] for e in record["events"]] == ["created", "machine_offline"]
    assert reply(relay.admin("GET", "/commands/unknown")) == error(404, "command_not_found")


def test_invalid_command_id_is_400(relay: Relay) -> None:
    assert reply(relay.admin("GET", "/commands/" + "x" * 129)) == error(400, "invalid_command_id")
    assert reply(relay.admin("POST", "/commands/a%01b/cancel")) == error(400, "invalid_command_id")


@pytest.mark.parametrize(("query", "count"), [("", 3), ("?limit=2", 2), ("?limit=abc", 3), ("?limit=", 1),
                                              ("?limit=0", 1), ("?limit=-3", 1), ("?limit=2.9", 2),
                                              ("?limit=5&userId=zhangsan", 1), ("?userId=", 3)])
def test_audit_recent_limit_and_filters(relay: Relay, query: str, count: int) -> None:
    for text, user in (("one", "u1"), ("two", "u1"), ("three", "zhangsan")):
        relay.clock.now += 1
        post_json(relay, message(text, user_id=user, machineId="dev-machine-1"))
    items = relay.admin("GET", "/audit/recent" + query).get_json()["items"]
    assert len(items) == count
    assert [i["updatedAt"] for i in items] == sorted((i["updatedAt"] for i in items), reverse=True)


def test_cancel_flow(relay: Relay) -> None:
    agent = relay.connect()
    command_id = post_json(relay, message("@dev fix it")).get_json()["commandId"]
    assert reply(relay.admin("POST", "/commands/nope/cancel")) == error(404, "command_not_inflight")
    assert reply(relay.admin("POST", f"/commands/{command_id}/cancel", json={"userId": "zhangsan"})) == error(
        403, "cancel_not_authorized")
    assert reply(relay.admin("POST", f"/commands/{command_id}/cancel", json={"userId": "u1"})) == (
        200, JSON_CT, f'{{"status":"cancel_sent","commandId":"{command_id}"}}')
    assert agent.frames[-1]["type"] == "command.cancel"
    relay.disconnect(agent)
    assert reply(relay.admin("POST", f"/commands/{command_id}/cancel")) == error(409, "machine_offline")


def test_retry_flow(relay: Relay) -> None:
    command_id = post_json(relay, message("@dev fix it")).get_json()["commandId"]
    assert reply(relay.admin("POST", "/commands/nope/retry")) == error(404, "command_not_found_for_retry")
    assert reply(relay.admin("POST", f"/commands/{command_id}/retry", json={"userId": "zhangsan"})) == error(
        403, "retry_not_authorized")
    assert reply(relay.admin("POST", f"/commands/{command_id}/retry")) == error(409, "machine_offline")
    relay.connect()
    body = relay.admin("POST", f"/commands/{command_id}/retry").get_json()
    assert list(body) == ["status", "commandId", "retriedFrom"]
    assert (body["status"], body["retriedFrom"]) == ("retried_sent", command_id)


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_cancel_and_retry_with_empty_json_body_are_400(relay: Relay, action: str) -> None:
    response = relay.admin("POST", f"/commands/x/{action}", data=b"", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.get_json()["code"] == "FST_ERR_CTP_EMPTY_JSON_BODY"


# -- §2.10 callback paths, §2.13 unknown routes, §2.14 /agent -----------------------------------------


def test_custom_callback_path_is_served_beside_the_default(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay(WECOM_CALLBACK_PATH=" hooks//wecom/?x=1 ", WECOM_ENCODING_AES_KEY="")
    for path in ("/hooks/wecom", "/wecom/callback"):
        assert reply(relay.client.get(path + "?echostr=abc")) == (200, "text/plain", "abc")
        assert post_json(relay, {}, path=path).status_code == 400
    assert relay.client.get("/hooks/wecom/?echostr=abc").status_code == 404


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/wecom/callback/"), ("GET", "/agent"),
                                              ("DELETE", "/healthz"), ("OPTIONS", "/metrics")])
def test_unknown_routes_are_the_fastify_404(relay: Relay, method: str, path: str) -> None:
    assert reply(relay.client.open(path, method=method)) == (
        404, JSON_CT, json.dumps({"message": f"Route {method}:{path} not found", "error": "Not Found",
                                  "statusCode": 404}, separators=(",", ":")))


def test_doubled_slashes_are_not_merged_or_redirected(relay: Relay) -> None:
    raw = {"PATH_INFO": "/wecom//callback", "RAW_URI": "/wecom//callback"}
    assert reply(relay.client.get("/", environ_overrides=raw)) == (
        404, JSON_CT, '{"message":"Route GET:/wecom//callback not found","error":"Not Found","statusCode":404}')


# -- §2.11 URL verification ----------------------------------------------------------------------------


def signed(echostr: str, signature: Optional[str] = None) -> str:
    sig = signature or create_signature(TOKEN, "1795632479", "n1", echostr)
    return "?" + urlencode({"msg_signature": sig, "timestamp": "1795632479", "nonce": "n1", "echostr": echostr})


def plus_free_echostr() -> str:
    """An encrypted echostr whose base64 has no ``+`` (which a raw query would turn into a space)."""
    for seed in range(256):
        echostr = encrypt_message("echo-123", AES_KEY, CORP_ID, lambda n, seed=seed: bytes([seed]) * n)
        if "+" not in echostr:
            return echostr
    raise AssertionError("no plus-free ciphertext found")


def unencoded_query(echostr: str) -> str:
    signature = create_signature(TOKEN, "1795632479", "n1", echostr)
    return f"?msg_signature={signature}&timestamp=1795632479&nonce=n1&echostr={echostr}"


def test_verify_accepts_an_unencoded_echostr(relay: Relay) -> None:
    assert reply(relay.client.get("/wecom/callback" + unencoded_query(plus_free_echostr()))) == (
        200, "text/plain", "echo-123")


def test_verify_decrypts_a_signed_echostr(relay: Relay) -> None:
    echostr = encrypt_message("echo-123", AES_KEY, CORP_ID)
    assert reply(relay.client.get("/wecom/callback" + signed(echostr))) == (200, "text/plain", "echo-123")


def test_verify_without_signature_fields_skips_the_check(relay: Relay) -> None:
    echostr = encrypt_message("echo-123", AES_KEY, CORP_ID)
    assert reply(relay.client.get("/wecom/callback?" + urlencode({"echostr": echostr}))) == (
        200, "text/plain", "echo-123")


def test_verify_with_bad_signature_is_401(relay: Relay) -> None:
    echostr = encrypt_message("echo-123", AES_KEY, CORP_ID)
    assert reply(relay.client.get("/wecom/callback" + signed(echostr, "0" * 40))) == error(401, "invalid_signature")


def test_verify_without_echostr_is_400(relay: Relay) -> None:
    assert reply(relay.client.get("/wecom/callback")) == error(400, "missing_echostr")


def test_verify_with_undecryptable_echostr_is_400_not_500(relay: Relay) -> None:
    assert reply(relay.client.get("/wecom/callback?echostr=abc")) == error(400, "invalid_echostr")


def test_verify_echoes_when_no_aes_key(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay(WECOM_ENCODING_AES_KEY="")
    assert reply(relay.client.get("/wecom/callback?echostr=echo-123")) == (200, "text/plain", "echo-123")


# -- §2.12 the POST table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["WECOM_TOKEN", "WECOM_ENCODING_AES_KEY"])
def test_row_encrypt_without_crypto_config(make_relay: Callable[..., Relay], missing: str) -> None:
    relay = make_relay(**{missing: ""})
    body, query = envelope(wecom_xml())
    assert reply(relay.client.post("/wecom/callback?" + query, data=body, content_type="application/xml")) == error(
        400, "missing_wecom_crypto_config")


def test_row_encrypt_without_signature_fields(relay: Relay) -> None:
    body, _ = envelope(wecom_xml())
    assert reply(relay.client.post("/wecom/callback?timestamp=1&nonce=n", data=body,
                                   content_type="application/xml")) == error(400, "missing_signature_fields")


def test_row_signature_mismatch(relay: Relay) -> None:
    body, _ = envelope(wecom_xml())
    assert reply(relay.client.post("/wecom/callback?msg_signature=bad&timestamp=1&nonce=n", data=body,
                                   content_type="application/xml")) == error(401, "invalid_signature")


def test_row_decrypt_failure_is_a_clean_400(relay: Relay) -> None:
    garbage = "AAAA"
    timestamp = str(START_MS // 1000)
    query = urlencode({"msg_signature": create_signature(TOKEN, timestamp, "n", garbage), "timestamp": timestamp,
                       "nonce": "n"})
    assert reply(relay.client.post("/wecom/callback?" + query, json={"encrypt": garbage})) == error(
        400, "invalid_encrypted_payload")


def test_row_decrypted_payload_neither_xml_nor_json(relay: Relay) -> None:
    body, query = envelope("plain words")
    assert reply(relay.client.post("/wecom/callback?" + query, data=body, content_type="application/xml")) == error(
        400, "invalid_decrypted_payload")


@pytest.mark.parametrize("body", [{}, {"msgId": "1", "userId": "u1"}, {"msgId": "1", "text": "hi"},
                                  {"userId": "u1", "text": "hi"}, {"msgId": "1", "userId": "u1", "text": "   "}])
def test_row_invalid_payload(relay: Relay, body: dict[str, str]) -> None:
    assert reply(post_json(relay, body)) == error(400, "invalid_payload")


def test_row_rate_limited(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay(RATE_LIMIT_PER_MINUTE="2")
    statuses = [post_json(relay, message("hi", user_id="stranger")).status_code for _ in range(3)]
    assert statuses == [403, 403, 429]
    assert reply(post_json(relay, message("hi", user_id="stranger"))) == error(429, "rate_limited")


def test_row_user_not_allowed(relay: Relay) -> None:
    assert reply(post_json(relay, message("hi", user_id="intruder"))) == error(403, "user_not_allowed")


def test_row_missing_machine_id(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay(MACHINE_BINDINGS="")
    assert reply(post_json(relay, message("hi"))) == error(400, "missing_machine_id")


def test_row_machine_binding_mismatch(relay: Relay) -> None:
    assert reply(post_json(relay, message("hi", machineId="other"))) == error(403, "machine_binding_mismatch")


def test_row_encrypted_reply_without_corp_id(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay(WECOM_CORP_ID="")
    body, query = envelope(wecom_xml(content="@dev status"))
    assert reply(relay.client.post("/wecom/callback?" + query, data=body, content_type="application/xml")) == error(
        500, "missing_wecom_encrypted_reply_config")


def test_row_ok_json(relay: Relay) -> None:
    status, content_type, body = reply(post_json(relay, message("@dev status")))
    assert (status, content_type) == (200, JSON_CT)
    assert list(json.loads(body)) == ["status", "machineId", "commandId", "locale"]


def test_row_ok_passive_xml(relay: Relay) -> None:
    status, content_type, body = reply(relay.client.post("/wecom/callback", data=wecom_xml(),
                                                         content_type="application/xml"))
    assert (status, content_type) == (200, "application/xml")
    assert "<Content><![CDATA[命令未执行：目标机器离线。]]></Content>" in body


def test_row_ok_success_when_passive_reply_is_off(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay(WECOM_PASSIVE_REPLY="off")
    assert reply(relay.client.post("/wecom/callback", data=wecom_xml(), content_type="text/xml")) == (
        200, "text/plain", "success")


def test_row_ok_encrypted_xml(relay: Relay) -> None:
    relay.connect()
    body, query = envelope(wecom_xml(from_user="zhangsan", to_user=CORP_ID, content="状态"))
    status, content_type, text = reply(relay.client.post("/wecom/callback?" + query, data=body,
                                                         content_type="application/xml"))
    assert (status, content_type) == (200, "application/xml")
    fields = re.fullmatch(r"<xml><Encrypt><!\[CDATA\[(.+)\]\]></Encrypt><MsgSignature><!\[CDATA\[([0-9a-f]{40})\]\]>"
                          r"</MsgSignature><TimeStamp>(\d+)</TimeStamp><Nonce><!\[CDATA\[([0-9a-f]{16})\]\]></Nonce></xml>",
                          text)
    assert fields is not None
    encrypted, signature, timestamp, nonce = fields.groups()
    assert signature == create_signature(TOKEN, timestamp, nonce, encrypted)
    assert decrypt_message(encrypted, AES_KEY) == (
        "<xml><ToUserName><![CDATA[zhangsan]]></ToUserName><FromUserName><![CDATA[ww123456]]></FromUserName>"
        "<CreateTime>1795632479</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        "<Content><![CDATA[命令已接收，已分发到本地代理。]]></Content></xml>")


def test_fastify_level_rows(relay: Relay) -> None:
    post = relay.client.post
    assert reply(post("/wecom/callback", data="{", content_type="application/json"))[0] == 400
    assert json.loads(reply(post("/wecom/callback", data="", content_type="application/json"))[2])["code"] == (
        "FST_ERR_CTP_EMPTY_JSON_BODY")
    assert reply(post("/wecom/callback", data="x", content_type="application/octet-stream"))[0] == 415
    assert reply(post("/wecom/callback", data="x" * (1024 * 1024 + 1), content_type="text/plain"))[0] == 413
    assert reply(post("/wecom/callback")) == error(400, "invalid_payload")
    assert reply(post("/wecom/callback", data=wecom_xml(), content_type="application/xml; charset=utf-8"))[:2] == (
        200, "application/xml")


# -- the golden transcript ------------------------------------------------------------------------------

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
AGE = re.compile(r'"ageMs":\d+')


def mask(text: str) -> str:
    return AGE.sub('"ageMs":0', ISO.sub("<ts>", UUID.sub("<uuid>", text)))


def transcript_sections() -> dict[str, tuple[int, str, str]]:
    sections: dict[str, tuple[int, str, str]] = {}
    lines = TRANSCRIPT.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("## ") or index + 2 >= len(lines):
            continue
        head = re.fullmatch(r"(\d{3}) (.+)", lines[index + 1])
        if head:
            sections[line[3:]] = (int(head.group(1)), head.group(2), lines[index + 2])
    return sections


def transcript_decrypted_reply() -> str:
    match = re.search(r"^decrypted reply: (.+)$", TRANSCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert match
    return match.group(1)


#: Sections whose bodies hold records the lifecycle and stores build; only their shape is compared.
SHAPE_ONLY = {"command record", "command unknown-cmd", "audit recent limit=2", "audit recent limit=abc",
              "metrics", "ops/config"}


#: Objects keyed by data (status names), not by schema.
DATA_KEYED = {"audit.byStatus"}


def key_paths(value: Any, prefix: str = "") -> list[str]:
    """Every key path in document order (list items: the first one only)."""
    if isinstance(value, dict):
        paths = []
        for key, item in value.items():
            paths.append(prefix + key)
            if prefix + key not in DATA_KEYED:
                paths.extend(key_paths(item, prefix + key + "."))
        return paths
    if isinstance(value, list) and value:
        return key_paths(value[0], prefix + "0.")
    return []


def test_transcript_replay(relay: Relay) -> None:
    golden = transcript_sections()
    client = relay.client
    seen: dict[str, Any] = {}

    def step(name: str, response: Any) -> Any:
        relay.clock.now += 1
        seen[name] = response
        return response

    step("healthz", client.get("/healthz"))
    step("metrics no token", client.get("/metrics"))
    step("metrics wrong token", client.get("/metrics", headers={"x-admin-token": "nope"}))
    step("unknown route", client.get("/nope"))
    step("callback trailing slash", client.post("/wecom/callback/", json={}))
    first = message("@dev status", machineId="dev-machine-1")
    step("json offline", client.post("/wecom/callback", json=first))
    step("json dup", client.post("/wecom/callback", json=first))
    step("json invalid payload", client.post("/wecom/callback", json={"userId": "u1"}))
    step("json not allowed", client.post("/wecom/callback", json=message("hi", user_id="intruder")))
    step("json binding mismatch", client.post("/wecom/callback", json=message("hi", machineId="elsewhere")))
    step("json @dev only", client.post("/wecom/callback", json=message("@dev")))
    step("invalid json", client.post("/wecom/callback", data="{bad", content_type="application/json"))
    step("empty json body", client.post("/wecom/callback", data="", content_type="application/json"))
    step("unsupported ct", client.post("/wecom/callback", data="x", content_type="application/octet-stream"))
    step("no body no ct", client.post("/wecom/callback"))
    step("xml charset", client.post("/wecom/callback", data=wecom_xml(content="@dev help"),
                                    content_type="application/xml; charset=utf-8"))
    step("text/plain xml", client.post("/wecom/callback", data=wecom_xml(content="status"), content_type="text/plain"))
    step("form xml", client.post("/wecom/callback", data=urlencode({"xml": wecom_xml(content="hello")}),
                                 content_type="application/x-www-form-urlencoded"))
    step("json with from/to", client.post("/wecom/callback", json={"msgId": uuid.uuid4().hex, "fromUserName": "u1",
                                                                   "toUserName": "corp", "text": "hi"}))
    echostr = encrypt_message("echo-123", AES_KEY, CORP_ID)
    step("GET verify ok", client.get("/wecom/callback" + signed(echostr)))
    step("GET verify raw (unencoded)", client.get("/wecom/callback" + unencoded_query(plus_free_echostr())))
    step("GET verify bad sig", client.get("/wecom/callback" + signed(echostr, "0" * 40)))
    step("GET verify no sig", client.get("/wecom/callback?" + urlencode({"echostr": echostr})))
    step("GET missing echostr", client.get("/wecom/callback"))
    step("GET bad echostr", client.get("/wecom/callback?echostr=abc"))

    agent = relay.connect(running=1, pending=2)
    step("machines", relay.admin("GET", "/machines"))
    task = step("json sent", client.post("/wecom/callback", json=message("@dev fix the login bug"))).get_json()
    step("json sent help", client.post("/wecom/callback", json=message("help")))
    body, query = envelope(wecom_xml(from_user="zhangsan", to_user=CORP_ID, content="状态"))
    step("encrypted xml", client.post("/wecom/callback?" + query, data=body, content_type="application/xml"))
    step("encrypted missing sig", client.post("/wecom/callback", data=body, content_type="application/xml"))
    step("encrypted bad sig", client.post("/wecom/callback?msg_signature=bad&timestamp=1&nonce=n", data=body,
                                          content_type="application/xml"))
    encrypted = encrypt_message('{"msgId":"j1","userId":"u1","text":"hi"}', AES_KEY, CORP_ID)
    step("encrypted json", client.post("/wecom/callback?msg_signature=bad&timestamp=1&nonce=n",
                                       json={"encrypt": encrypted}))
    step("inflight", relay.admin("GET", "/inflight"))
    task_id = task["commandId"]
    step("cancel wrong user", relay.admin("POST", f"/commands/{task_id}/cancel", json={"userId": "zhangsan"}))
    step("cancel ok", relay.admin("POST", f"/commands/{task_id}/cancel", json={"userId": "u1"}))
    step("cancel unknown", relay.admin("POST", "/commands/unknown-cmd/cancel"))
    step("retry", relay.admin("POST", f"/commands/{task_id}/retry"))
    step("retry unknown", relay.admin("POST", "/commands/unknown-cmd/retry"))
    step("retry json empty body", relay.admin("POST", f"/commands/{task_id}/retry", data="",
                                              headers={"Content-Type": "application/json"}))
    relay.result(agent, task_id, "Diff proposal ready: 1 file")
    relay.result(agent, "unknown-cmd", "local only", status="error")
    step("command record", relay.admin("GET", f"/commands/{task_id}"))
    step("command unknown-cmd", relay.admin("GET", "/commands/unknown-cmd"))
    step("audit recent limit=2", relay.admin("GET", "/audit/recent?limit=2"))
    step("audit recent limit=abc", relay.admin("GET", "/audit/recent?limit=abc&status=machine_offline"))
    step("metrics", relay.admin("GET", "/metrics"))
    step("ops/config", relay.admin("GET", "/ops/config"))
    relay.disconnect(agent)
    step("machines after close", relay.admin("GET", "/machines"))

    deviations = {"GET bad echostr": (400, JSON_CT, '{"error":"invalid_echostr"}')}
    for name, response in seen.items():
        status, content_type, body = reply(response)
        expected = deviations.get(name, golden[name])
        assert (status, content_type) == expected[:2], name
        if name == "encrypted xml":
            match = re.search(r"<Encrypt><!\[CDATA\[(.+)\]\]></Encrypt>", body)
            assert match and decrypt_message(match.group(1), AES_KEY) == transcript_decrypted_reply()
        elif name in SHAPE_ONLY:
            paths = key_paths(json.loads(body))
            if name == "metrics":  # this relay adds store.domains (the migration's per-domain figures)
                paths = [p for p in paths if not p.startswith("store.domains")]
            assert paths == key_paths(json.loads(expected[2])), name
        else:
            assert mask(body) == mask(expected[2]), name
    assert set(seen) == set(golden)
