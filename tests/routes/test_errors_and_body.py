"""The HTTP layer on a minimal Flask app with a test double for the relay object.

Covers body parsing (reference §1 step 14), Fastify-shaped errors (§2.12, §2.13),
content types (§2.0), admin auth and the admin routes' request handling (§2.0-2.9),
and the callback routes' plumbing (§2.10-2.12).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay.lifecycle.types import Ack, InboundMessage
from relay.routes import register_routes
from relay.routes.admin import audit_limit, js_number, valid_command_id
from relay.routes.app_context import query_dict
from relay.routes.responses import dumps
from relay.routes.wecom_io import CryptoConfig

JSON_CT = "application/json; charset=utf-8"
CALLBACK = "/wecom/callback"
MAX_BODY = 1024
INVALID_JSON = ('{"statusCode":400,"code":"FST_ERR_CTP_INVALID_JSON_BODY","error":"Bad Request",'
                '"message":"Body is not valid JSON but content-type is set to \'application/json\'"}')
EMPTY_JSON = ('{"statusCode":400,"code":"FST_ERR_CTP_EMPTY_JSON_BODY","error":"Bad Request",'
              '"message":"Body cannot be empty when content-type is set to \'application/json\'"}')
UNSUPPORTED = ('{"statusCode":415,"code":"FST_ERR_CTP_INVALID_MEDIA_TYPE","error":"Unsupported Media Type",'
               '"message":"Unsupported Media Type"}')
TOO_LARGE = ('{"statusCode":413,"code":"FST_ERR_CTP_BODY_TOO_LARGE","error":"Payload Too Large",'
             '"message":"Request body is too large"}')
XML_BODY = ("<xml><ToUserName><![CDATA[corp]]></ToUserName><FromUserName><![CDATA[u1]]></FromUserName>"
            "<CreateTime>1700000000</CreateTime><Content><![CDATA[hello]]></Content><MsgId>m-1</MsgId></xml>")
OFFLINE = {"status": "machine_offline", "machineId": "dev-machine-1", "commandId": "c-1", "locale": "zh-CN"}


@dataclass
class FakeLifecycle:
    ack: Ack = field(default_factory=lambda: Ack(200, dict(OFFLINE)))
    received: list[InboundMessage] = field(default_factory=list)
    admin_calls: list[tuple[str, str, Optional[str]]] = field(default_factory=list)
    error: Optional[Exception] = None

    def handle_inbound(self, msg: InboundMessage) -> Ack:
        if self.error is not None:
            raise self.error
        self.received.append(msg)
        return self.ack

    def cancel(self, command_id: str, user_id: Optional[str]) -> tuple[int, dict[str, Any]]:
        self.admin_calls.append(("cancel", command_id, user_id))
        return 200, {"status": "cancel_sent", "commandId": command_id}

    def retry(self, command_id: str, user_id: Optional[str]) -> tuple[int, dict[str, Any]]:
        self.admin_calls.append(("retry", command_id, user_id))
        return 200, {"status": "retried_sent", "commandId": "new", "retriedFrom": command_id}


class FakeViews:
    def __init__(self) -> None:
        self.audit_args: list[tuple[Any, ...]] = []

    def metrics(self) -> dict[str, Any]:
        return {"machines": {"totalConnected": 0, "stale": 0}, "inflight": {"total": 0}}

    def ops_config(self) -> dict[str, Any]:
        return {"relay": {"adminTokenEnabled": True}, "wecom": {"callbackPath": CALLBACK}}

    def machines(self) -> dict[str, Any]:
        return {"items": [{"machineId": "dev-machine-1", "stale": False}]}

    def inflight(self) -> dict[str, Any]:
        return {"items": [{"commandId": "c-1", "ageMs": 107}]}

    def command(self, command_id: str) -> Optional[dict[str, Any]]:
        if command_id == "known":
            return {"commandId": "known", "status": "agent_ok", "summary": "完成", "events": []}
        return None

    def audit_recent(self, limit: int, user_id: Optional[str], machine_id: Optional[str], status: Optional[str]) -> dict[str, Any]:
        self.audit_args.append((limit, user_id, machine_id, status))
        return {"items": []}


def make_settings(**overrides: Any) -> SimpleNamespace:
    values = dict(
        wecom_token=None, wecom_encoding_aes_key=None, wecom_corp_id=None, wecom_passive_reply=True,
        admin_token=None, callback_routes=(CALLBACK,), max_body_bytes=MAX_BODY, callback_secret=None,
        wecom_timestamp_tolerance_s=300,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def make_app(**settings: Any) -> Flask:
    app = Flask("routes-test")
    made = make_settings(**settings)
    app.extensions["relay"] = SimpleNamespace(
        settings=made,
        crypto_config=CryptoConfig.from_settings(made),
        lifecycle=FakeLifecycle(),
        views=FakeViews(),
        clock=lambda: 1795632479123,
        crypto_random=lambda n: bytes(range(n)),
    )
    register_routes(app)
    return app


@pytest.fixture
def app() -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def relay_of(app: Flask) -> Any:
    return app.extensions["relay"]


def received(app: Flask) -> list[InboundMessage]:
    return relay_of(app).lifecycle.received


# -- responses -------------------------------------------------------------------------------------


def test_healthz_is_ok_json_with_charset(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (
        200, JSON_CT, '{"status":"ok"}')


def test_head_of_a_get_route_is_served(client: FlaskClient) -> None:
    assert client.head("/healthz").status_code == 200


def test_dumps_is_compact_ordered_and_utf8() -> None:
    assert dumps({"b": 1, "a": "命令", "c": [True, None]}) == '{"b":1,"a":"命令","c":[true,null]}'


def test_dumps_prints_numbers_like_javascript() -> None:
    assert dumps({"whole": 2.0, "half": 0.5, "nan": float("nan"), "inf": float("-inf")}) == (
        '{"whole":2,"half":0.5,"nan":null,"inf":null}')


def test_dumps_escapes_lone_surrogates_so_the_body_is_valid_utf8() -> None:
    text = dumps({"id": "a\ud800b"})
    assert text.encode("utf-8") == b'{"id":"a\\ud800b"}'


# -- unknown routes and methods ---------------------------------------------------------------------


def test_unknown_route_is_the_fastify_404(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (
        404, JSON_CT, '{"message":"Route GET:/nope not found","error":"Not Found","statusCode":404}')


def test_unknown_route_message_keeps_the_raw_target_with_query(client: FlaskClient) -> None:
    response = client.get("/no%20pe?x=1&y=a+b")
    assert response.json["message"] == "Route GET:/no%20pe?x=1&y=a+b not found"


def test_callback_with_trailing_slash_is_404(client: FlaskClient) -> None:
    response = client.post(CALLBACK + "/", json={})
    assert response.get_data(as_text=True) == (
        '{"message":"Route POST:/wecom/callback/ not found","error":"Not Found","statusCode":404}')


@pytest.mark.parametrize(("method", "path"), [("POST", "/healthz"), ("DELETE", CALLBACK), ("OPTIONS", "/healthz"),
                                              ("PUT", "/metrics"), ("GET", "/commands/x/cancel")])
def test_known_path_with_other_method_is_the_fastify_404(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    assert response.status_code == 404
    assert response.json == {"message": f"Route {method}:{path} not found", "error": "Not Found", "statusCode": 404}


@pytest.mark.parametrize("path", ["/healthz/", "/HEALTHZ", "/wecom//callback", "/commands/x/cancel/"])
def test_paths_are_matched_exactly(client: FlaskClient, path: str) -> None:
    response = client.get("/", environ_overrides={"PATH_INFO": path, "RAW_URI": path})
    assert (response.status_code, response.json["message"]) == (404, f"Route GET:{path} not found")


# -- uncaught errors ------------------------------------------------------------------------------


def test_uncaught_error_is_a_500_without_its_message(app: Flask) -> None:
    relay_of(app).lifecycle.error = RuntimeError("token=super-secret-value")
    response = app.test_client().post(CALLBACK, json={"msgId": "1", "userId": "u", "text": "t"})
    assert (response.status_code, response.content_type) == (500, JSON_CT)
    assert response.get_data(as_text=True) == (
        '{"statusCode":500,"error":"Internal Server Error","message":"Internal Server Error"}')


# -- body parsing --------------------------------------------------------------------------------


def post(client: FlaskClient, data: Any = None, content_type: Optional[str] = None, **kwargs: Any):
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return client.post(CALLBACK, data=data, headers=headers, **kwargs)


def test_invalid_json_is_the_fastify_400(client: FlaskClient) -> None:
    response = post(client, "{not json", "application/json")
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (400, JSON_CT, INVALID_JSON)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "   ", "{'a':1}", "[1,]"])
def test_json_that_javascript_rejects_is_invalid(client: FlaskClient, text: str) -> None:
    assert post(client, text, "application/json").get_data(as_text=True) == INVALID_JSON


def test_deeply_nested_json_is_invalid_not_a_crash() -> None:
    client = make_app(max_body_bytes=1 << 20).test_client()
    body = "[" * 100000 + "]" * 100000
    assert post(client, body, "application/json").get_data(as_text=True) == INVALID_JSON


def test_empty_json_body_is_the_fastify_400(client: FlaskClient) -> None:
    response = post(client, b"", "application/json")
    assert (response.status_code, response.get_data(as_text=True)) == (400, EMPTY_JSON)


@pytest.mark.parametrize("content_type", ["application/octet-stream", "multipart/form-data; boundary=x",
                                          "application/jsonx", "text/html"])
def test_other_content_types_are_415(client: FlaskClient, content_type: str) -> None:
    response = post(client, b"abc", content_type)
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (415, JSON_CT, UNSUPPORTED)


def test_body_without_content_type_is_415(client: FlaskClient) -> None:
    response = client.post(CALLBACK, data=b"abc", headers={"Content-Length": "3"})
    assert response.get_data(as_text=True) == UNSUPPORTED


def test_no_content_type_and_no_body_reaches_the_handler_empty(app: Flask, client: FlaskClient) -> None:
    response = client.post(CALLBACK)
    assert response.status_code == 200
    assert received(app) == [InboundMessage()]


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8", "application/json;charset=latin1"])
def test_json_content_type_parameters_and_case_are_ignored(app: Flask, client: FlaskClient, content_type: str) -> None:
    post(client, json.dumps({"msgId": "1", "userId": "u1", "text": "hi", "machineId": "m"}), content_type)
    assert received(app)[-1] == InboundMessage(msg_id="1", user_id="u1", machine_id="m", text="hi")


@pytest.mark.parametrize("content_type", ["application/xml", "application/xml; charset=utf-8", "text/xml", "text/plain"])
def test_string_content_types_are_read_as_xml(app: Flask, client: FlaskClient, content_type: str) -> None:
    response = post(client, XML_BODY.encode("utf-8"), content_type)
    assert received(app)[-1].msg_id == "m-1"
    assert received(app)[-1].xml_mode is True
    assert (response.status_code, response.content_type) == (200, "application/xml")


def test_form_body_is_flat_with_the_last_value_winning(app: Flask, client: FlaskClient) -> None:
    post(client, "msgId=1&msgId=2&userId=u1&text=a+b&machineId=m", "application/x-www-form-urlencoded")
    assert received(app)[-1] == InboundMessage(msg_id="2", user_id="u1", machine_id="m", text="a b")


def test_form_body_carrying_xml_gets_an_xml_reply(app: Flask, client: FlaskClient) -> None:
    from urllib.parse import urlencode

    response = post(client, urlencode({"xml": XML_BODY}), "application/x-www-form-urlencoded")
    assert received(app)[-1].xml_mode is True
    assert response.content_type == "application/xml"


def test_invalid_utf8_is_replaced_not_rejected(app: Flask, client: FlaskClient) -> None:
    post(client, b'{"msgId":"1","userId":"u","text":"a\xffb"}', "application/json")
    assert received(app)[-1].text == "a\ufffdb"


def test_body_over_the_cap_is_413(client: FlaskClient) -> None:
    response = post(client, b"x" * (MAX_BODY + 1), "text/plain")
    assert (response.status_code, response.get_data(as_text=True)) == (413, TOO_LARGE)


def test_body_at_the_cap_is_accepted(client: FlaskClient) -> None:
    assert post(client, b"x" * MAX_BODY, "text/plain").status_code == 200


def test_chunked_body_over_the_cap_is_413(client: FlaskClient) -> None:
    response = client.post(
        CALLBACK,
        input_stream=io.BytesIO(b"x" * (MAX_BODY * 3)),
        headers={"Content-Type": "text/plain", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert (response.status_code, response.get_data(as_text=True)) == (413, TOO_LARGE)


def test_werkzeug_max_content_length_is_reported_like_fastify(app: Flask) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 10
    response = app.test_client().post(CALLBACK, data=b"x" * 11, headers={"Content-Type": "text/plain"})
    assert (response.status_code, response.get_data(as_text=True)) == (413, TOO_LARGE)


# -- callback plumbing -----------------------------------------------------------------------------


def test_callback_json_ack_is_the_lifecycle_payload_in_order(client: FlaskClient) -> None:
    response = post(client, json.dumps({"msgId": "1", "userId": "u1", "text": "hi"}), "application/json")
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (
        200, JSON_CT,
        '{"status":"machine_offline","machineId":"dev-machine-1","commandId":"c-1","locale":"zh-CN"}')


def test_callback_lifecycle_error_is_json(app: Flask) -> None:
    relay_of(app).lifecycle.ack = Ack(403, {"error": "user_not_allowed"})
    response = app.test_client().post(CALLBACK, data=XML_BODY, headers={"Content-Type": "application/xml"})
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (
        403, JSON_CT, '{"error":"user_not_allowed"}')


def test_callback_xml_ack_has_no_charset_and_uses_the_relay_clock(client: FlaskClient) -> None:
    response = post(client, XML_BODY, "application/xml; charset=utf-8")
    assert response.headers["Content-Type"] == "application/xml"
    assert "<CreateTime>1795632479</CreateTime>" in response.get_data(as_text=True)
    assert "<Content><![CDATA[命令未执行：目标机器离线。]]></Content>" in response.get_data(as_text=True)


def test_callback_success_ack_is_text_plain_without_charset() -> None:
    app = make_app(wecom_passive_reply=False)
    response = app.test_client().post(CALLBACK, data=XML_BODY, headers={"Content-Type": "application/xml"})
    assert (response.headers["Content-Type"], response.get_data(as_text=True)) == ("text/plain", "success")


def test_callback_rejection_skips_the_lifecycle(app: Flask, client: FlaskClient) -> None:
    response = post(client, json.dumps({"encrypt": "abc"}), "application/json")
    assert (response.status_code, response.get_data(as_text=True)) == (400, '{"error":"missing_wecom_crypto_config"}')
    assert received(app) == []


def test_callback_reads_signature_fields_from_the_query() -> None:
    app = make_app(wecom_token="token1", wecom_encoding_aes_key="abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")
    response = app.test_client().post(CALLBACK + "?msg_signature=bad&timestamp=1&nonce=n", json={"encrypt": "abc"})
    assert (response.status_code, response.get_data(as_text=True)) == (401, '{"error":"invalid_signature"}')


@pytest.mark.parametrize("target, expected", [
    ("/q", {}),
    ("/q?other=1", {}),
    ("/q?nonce=n&timestamp=1&nonce=m&msg_signature=", {"nonce": "n,m", "timestamp": "1", "msg_signature": ""}),
])
def test_query_dict_joins_repeated_keys_and_leaves_out_absent_ones(target: str, expected: dict[str, str]) -> None:
    with Flask(__name__).test_request_context(target):
        assert query_dict("msg_signature", "timestamp", "nonce") == expected


def test_verify_get_answers_text_plain(client: FlaskClient) -> None:
    response = client.get(CALLBACK + "?echostr=echo-123")
    assert (response.status_code, response.headers["Content-Type"], response.get_data(as_text=True)) == (
        200, "text/plain", "echo-123")


def test_verify_get_decodes_plus_as_space(client: FlaskClient) -> None:
    assert client.get(CALLBACK + "?echostr=a+b").get_data(as_text=True) == "a b"


def test_verify_get_without_echostr_is_400(client: FlaskClient) -> None:
    response = client.get(CALLBACK)
    assert (response.status_code, response.get_data(as_text=True)) == (400, '{"error":"missing_echostr"}')


def test_callback_is_served_on_every_configured_path() -> None:
    app = make_app(callback_routes=("/custom/hook", CALLBACK))
    client = app.test_client()
    for path in ("/custom/hook", CALLBACK):
        assert client.get(path + "?echostr=x").get_data(as_text=True) == "x"
        assert client.post(path, json={}).status_code == 200


def test_callback_path_clashing_with_a_route_fails_registration() -> None:
    with pytest.raises(ValueError, match="/healthz"):
        make_app(callback_routes=("/healthz", CALLBACK))


def test_callback_path_with_converter_syntax_is_refused() -> None:
    with pytest.raises(ValueError, match="may not contain"):
        make_app(callback_routes=("/hook/<id>", CALLBACK))


# -- admin auth ---------------------------------------------------------------------------------

ADMIN_GETS = ["/metrics", "/ops/config", "/machines", "/inflight", "/commands/known", "/audit/recent"]
ADMIN_POSTS = ["/commands/c-1/cancel", "/commands/c-1/retry"]


@pytest.mark.parametrize("path", ADMIN_GETS + ADMIN_POSTS)
def test_admin_routes_are_open_without_a_token(client: FlaskClient, path: str) -> None:
    response = client.open(path, method="POST" if path in ADMIN_POSTS else "GET")
    assert (response.status_code, response.content_type) == (200, JSON_CT)


@pytest.mark.parametrize("path", ADMIN_GETS + ADMIN_POSTS)
@pytest.mark.parametrize("headers", [{}, {"x-admin-token": "wrong"}, {"x-admin-token": ""}, {"x-admin-token": "s3cret "}])
def test_admin_routes_refuse_a_missing_or_wrong_token(path: str, headers: dict[str, str]) -> None:
    client = make_app(admin_token="s3cret").test_client()
    response = client.open(path, method="POST" if path in ADMIN_POSTS else "GET", headers=headers)
    assert (response.status_code, response.content_type, response.get_data(as_text=True)) == (
        401, JSON_CT, '{"error":"unauthorized_admin_request"}')


@pytest.mark.parametrize("path", ADMIN_GETS + ADMIN_POSTS)
def test_admin_routes_accept_the_token(path: str) -> None:
    client = make_app(admin_token="s3cret").test_client()
    response = client.open(path, method="POST" if path in ADMIN_POSTS else "GET", headers={"X-Admin-Token": "s3cret"})
    assert response.status_code == 200


def test_admin_token_with_non_ascii_characters_matches_its_utf8_bytes() -> None:
    client = make_app(admin_token="clé-令牌").test_client()
    wsgi_value = "clé-令牌".encode("utf-8").decode("latin-1")
    assert client.get("/metrics", headers={"x-admin-token": wsgi_value}).status_code == 200
    assert client.get("/metrics", headers={"x-admin-token": "cl\xe9-"}).status_code == 401


@pytest.mark.parametrize("path", ["/healthz", CALLBACK + "?echostr=x"])
def test_health_and_callback_need_no_token(path: str) -> None:
    assert make_app(admin_token="s3cret").test_client().get(path).status_code == 200


def test_admin_auth_runs_before_the_body_is_read() -> None:
    client = make_app(admin_token="s3cret").test_client()
    response = client.post("/commands/c-1/cancel", data="{bad", headers={"Content-Type": "application/json"})
    assert response.status_code == 401


# -- admin routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "view"), [("/metrics", "metrics"), ("/ops/config", "ops_config"),
                                            ("/machines", "machines"), ("/inflight", "inflight")])
def test_admin_views_are_returned_as_json(client: FlaskClient, path: str, view: str) -> None:
    response = client.get(path)
    assert response.get_data(as_text=True) == dumps(getattr(FakeViews(), view)())


def test_command_record_is_returned_unwrapped(client: FlaskClient) -> None:
    response = client.get("/commands/known")
    assert response.get_data(as_text=True) == (
        '{"commandId":"known","status":"agent_ok","summary":"完成","events":[]}')


def test_unknown_command_is_404(client: FlaskClient) -> None:
    response = client.get("/commands/other")
    assert (response.status_code, response.get_data(as_text=True)) == (404, '{"error":"command_not_found"}')


@pytest.mark.parametrize("path", ["/commands/" + "a" * 129, "/commands/a%0Ab", "/commands/a%7Fb", "/commands/%C2%85",
                                  "/commands/" + "a" * 129 + "/cancel", "/commands/a%00/retry"])
def test_invalid_command_ids_are_400(app: Flask, client: FlaskClient, path: str) -> None:
    method = "POST" if path.endswith(("/cancel", "/retry")) else "GET"
    response = client.open(path, method=method)
    assert (response.status_code, response.get_data(as_text=True)) == (400, '{"error":"invalid_command_id"}')
    assert relay_of(app).lifecycle.admin_calls == []


def test_command_id_of_128_characters_is_accepted(client: FlaskClient) -> None:
    assert client.get("/commands/" + "a" * 128).status_code == 404
    assert valid_command_id("命令-" * 42 + "ab")


@pytest.mark.parametrize(("query", "expected"), [
    ("", (50, None, None, None)),
    ("?limit=2", (2, None, None, None)),
    ("?limit=abc", (50, None, None, None)),
    ("?limit=", (1, None, None, None)),
    ("?limit=0", (1, None, None, None)),
    ("?limit=-5", (1, None, None, None)),
    ("?limit=2.9", (2, None, None, None)),
    ("?limit=Infinity", (50, None, None, None)),
    ("?userId=u1&machineId=&status=agent_ok", (50, "u1", None, "agent_ok")),
    ("?userId=&machineId=dev-1&status=", (50, None, "dev-1", None)),
])
def test_audit_recent_parses_limit_and_filters(app: Flask, client: FlaskClient, query: str, expected: tuple[Any, ...]) -> None:
    response = client.get("/audit/recent" + query)
    assert response.get_data(as_text=True) == '{"items":[]}'
    assert relay_of(app).views.audit_args == [expected]


@pytest.mark.parametrize(("text", "expected"), [
    ("", 0.0), ("  ", 0.0), (" 12 ", 12.0), ("1e3", 1000.0), ("0x10", 16.0), ("0o17", 15.0), ("0b101", 5.0),
    ("-2.5", -2.5), (".5", 0.5), ("5.", 5.0), ("+7", 7.0), ("-Infinity", float("-inf")), ("\ufeff3\u3000", 3.0),
])
def test_js_number_matches_javascript(text: str, expected: float) -> None:
    assert js_number(text) == expected


@pytest.mark.parametrize("text", ["abc", "1_000", "-0x10", "0x", "1e", "inf", "nan", "12px", "١٢", "0x١"])
def test_js_number_gives_nan_for_what_javascript_rejects(text: str) -> None:
    assert js_number(text) != js_number(text)


def test_audit_limit_is_clamped_to_an_integer_range() -> None:
    assert audit_limit("1e300") == 2**31 - 1
    assert audit_limit("0x" + "f" * 300) == 50
    assert audit_limit(None) == 50


@pytest.mark.parametrize("action", ["cancel", "retry"])
@pytest.mark.parametrize(("kwargs", "user_id"), [
    ({}, None),
    ({"json": {"userId": "u1"}}, "u1"),
    ({"json": {"userId": ""}}, None),
    ({"json": {"userId": 5}}, None),
    ({"json": ["u1"]}, None),
    ({"json": None}, None),
    ({"data": "userId=u2", "content_type": "application/x-www-form-urlencoded"}, "u2"),
    ({"data": "<xml/>", "content_type": "application/xml"}, None),
])
def test_cancel_and_retry_pass_the_optional_user_id(app: Flask, client: FlaskClient, action: str,
                                                    kwargs: dict[str, Any], user_id: Optional[str]) -> None:
    response = client.post(f"/commands/c-1/{action}", **kwargs)
    assert response.status_code == 200
    assert relay_of(app).lifecycle.admin_calls == [(action, "c-1", user_id)]


def test_cancel_and_retry_answer_with_the_lifecycle_payload(client: FlaskClient) -> None:
    assert client.post("/commands/c-1/cancel").get_data(as_text=True) == '{"status":"cancel_sent","commandId":"c-1"}'
    assert client.post("/commands/c-1/retry").get_data(as_text=True) == (
        '{"status":"retried_sent","commandId":"new","retriedFrom":"c-1"}')


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_cancel_and_retry_with_empty_json_body_are_the_fastify_400(app: Flask, client: FlaskClient, action: str) -> None:
    response = client.post(f"/commands/c-1/{action}", data=b"", headers={"Content-Type": "application/json"})
    assert (response.status_code, response.get_data(as_text=True)) == (400, EMPTY_JSON)
    assert relay_of(app).lifecycle.admin_calls == []


def test_other_http_errors_get_the_fastify_shape_without_detail(app: Flask) -> None:
    from werkzeug.exceptions import BadRequest

    def boom() -> None:
        raise BadRequest("detail that stays in the logs")

    app.add_url_rule("/boom", "boom", boom)
    response = app.test_client().get("/boom")
    assert (response.status_code, response.get_data(as_text=True)) == (
        400, '{"statusCode":400,"error":"Bad Request","message":"Bad Request"}')


def test_status_phrases_are_nodes() -> None:
    from relay.routes.errors import status_phrase

    assert [status_phrase(code) for code in (413, 414, 415, 500, 599)] == [
        "Payload Too Large", "URI Too Long", "Unsupported Media Type", "Internal Server Error", "Unknown Error"]
