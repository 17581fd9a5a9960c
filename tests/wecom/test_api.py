"""The WeCom API client (§6.4) against a local stub server: request shapes, the token cache keyed by
(corpId, secret), invalid-token resend, the reference's error messages, and timeouts and retries."""
from __future__ import annotations

import json

import pytest

from relay.messages import analyze_push_failure, utf16_len
from relay.wecom.api import RetryPolicy, WeComApiClient, WeComApiConfig, WeComApiError

CONFIG = WeComApiConfig(corp_id="corp 1&x", agent_secret="s/é+", agent_id=1000002)
TOKEN_OK = {"errcode": 0, "errmsg": "ok", "access_token": "tok+/=1", "expires_in": 7200}
SENT_OK = {"errcode": 0, "errmsg": "ok"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _client(url: str, clock: Clock | None = None, sleeps: Sleeps | None = None, **policy: float) -> WeComApiClient:
    return WeComApiClient(
        base_url=url,
        policy=RetryPolicy(sleep=sleeps if sleeps is not None else Sleeps(), jitter=lambda: 0.5, **policy),
        clock=clock or Clock(),
    )


def test_send_text_request_shapes(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, SENT_OK)
    reply = _client(http_stub.url).send_text(CONFIG, "zhangsan", "hello 你好")
    assert reply == SENT_OK
    token_request, send_request = http_stub.requests
    assert (token_request.method, token_request.path) == ("GET", "/cgi-bin/gettoken")
    assert token_request.query == {"corpid": ["corp 1&x"], "corpsecret": ["s/é+"]}
    assert (send_request.method, send_request.path) == ("POST", "/cgi-bin/message/send")
    assert send_request.query == {"access_token": ["tok+/=1"]}
    assert send_request.headers["content-type"] == "application/json"
    assert send_request.body == (
        '{"touser":"zhangsan","msgtype":"text","agentid":1000002,"text":{"content":"hello 你好"},'
        '"safe":0,"enable_id_trans":0,"enable_duplicate_check":0}'
    ).encode("utf-8")


def test_query_values_are_encoded_like_encode_uri_component(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    _client(http_stub.url).get_access_token("a b&c", "x/y+z=é!*'()~")
    assert http_stub.requests[0].query == {"corpid": ["a b&c"], "corpsecret": ["x/y+z=é!*'()~"]}


def test_content_is_cut_to_1900_utf16_units(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, SENT_OK)
    _client(http_stub.url).send_text(CONFIG, "u1", "a" + "😀" * 1000)
    content = http_stub.requests[1].json()["text"]["content"]
    assert content == "a" + "😀" * 949
    assert utf16_len(content) == 1899


def test_partial_success_with_invalid_user_is_success(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, {"errcode": 0, "errmsg": "ok", "invaliduser": "nobody"})
    assert _client(http_stub.url).send_text(CONFIG, "nobody", "hi")["invaliduser"] == "nobody"


def test_token_is_cached_per_corp_and_secret(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    client = _client(http_stub.url)
    client.get_access_token("corp", "secret-a")
    client.get_access_token("corp", "secret-a")
    client.get_access_token("corp", "secret-b")
    client.get_access_token("other-corp", "secret-a")
    assert http_stub.paths() == ["/cgi-bin/gettoken"] * 3


def test_token_is_refetched_30_seconds_before_expiry(http_stub) -> None:
    http_stub.reply(200, {**TOKEN_OK, "expires_in": 100})
    clock = Clock()
    client = _client(http_stub.url, clock=clock)
    client.get_access_token("corp", "secret")
    clock.now += 69
    client.get_access_token("corp", "secret")
    assert len(http_stub.requests) == 1
    clock.now += 1
    client.get_access_token("corp", "secret")
    assert len(http_stub.requests) == 2


def test_token_without_expires_in_lasts_7200_seconds(http_stub) -> None:
    http_stub.reply(200, {"errcode": 0, "access_token": "t"})
    clock = Clock()
    client = _client(http_stub.url, clock=clock)
    client.get_access_token("corp", "secret")
    clock.now += 7169
    client.get_access_token("corp", "secret")
    assert len(http_stub.requests) == 1


@pytest.mark.parametrize("errcode", [40014, 42001, 40001])
def test_invalid_token_is_refetched_and_the_message_resent_once(http_stub, errcode: int) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, {"errcode": errcode, "errmsg": "invalid access_token"})
    http_stub.reply(200, {**TOKEN_OK, "access_token": "fresh"})
    http_stub.reply(200, SENT_OK)
    client = _client(http_stub.url)
    assert client.send_text(CONFIG, "u1", "hi") == SENT_OK
    assert http_stub.paths() == ["/cgi-bin/gettoken", "/cgi-bin/message/send"] * 2
    assert http_stub.requests[3].query == {"access_token": ["fresh"]}
    client.send_text(CONFIG, "u1", "again")
    assert http_stub.requests[4].query == {"access_token": ["fresh"]}


def test_resend_happens_only_once(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, {"errcode": 42001, "errmsg": "access_token expired"})
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, {"errcode": 42001, "errmsg": "access_token expired"})
    expected = "^wecom send message failed: http=200 code=42001 msg=access_token expired$"
    with pytest.raises(WeComApiError, match=expected):
        _client(http_stub.url).send_text(CONFIG, "u1", "hi")
    assert len(http_stub.requests) == 4


def test_send_error_message_format_and_analysis(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(
        200, {"errcode": 60020, "errmsg": "not allow to access from your ip, hint: [x], from ip: 1.2.3.4, more info"}
    )
    with pytest.raises(WeComApiError) as caught:
        _client(http_stub.url).send_text(CONFIG, "u1", "hi")
    assert str(caught.value) == (
        "wecom send message failed: http=200 code=60020 msg=not allow to access from your ip, hint: [x], "
        "from ip: 1.2.3.4, more info"
    )
    assert (caught.value.http_status, caught.value.errcode) == (200, 60020)
    failure = analyze_push_failure(str(caught.value))
    assert (failure.code, failure.outbound_ip) == ("60020", "1.2.3.4")


def test_get_token_error_message(http_stub) -> None:
    http_stub.reply(200, {"errcode": 40013, "errmsg": "invalid corpid"})
    with pytest.raises(WeComApiError, match="^wecom get token failed: http=200 code=40013 msg=invalid corpid$"):
        _client(http_stub.url).send_text(CONFIG, "u1", "hi")


def test_token_reply_without_access_token_fails(http_stub) -> None:
    http_stub.reply(200, {"errcode": 0, "errmsg": "ok", "access_token": ""})
    with pytest.raises(WeComApiError, match="^wecom get token failed: http=200 code=0 msg=ok$"):
        _client(http_stub.url).get_access_token("corp", "secret")


def test_empty_reply_body_fails_with_undefined_fields(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, b"")
    with pytest.raises(WeComApiError, match="^wecom send message failed: http=200 code=undefined msg=undefined$"):
        _client(http_stub.url).send_text(CONFIG, "u1", "hi")


def test_non_json_reply_is_previewed_in_160_units(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(404, "<html>" + "x" * 300)
    with pytest.raises(WeComApiError) as caught:
        _client(http_stub.url).send_text(CONFIG, "u1", "hi")
    assert str(caught.value) == "wecom send message failed: http=404 code=-1 msg=non_json_response: <html>" + "x" * 154
    assert len(http_stub.requests) == 2  # a 4xx is not retried


def test_5xx_is_retried_with_jittered_backoff(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(502, "bad gateway")
    http_stub.reply(503, "unavailable")
    http_stub.reply(200, SENT_OK)
    sleeps = Sleeps()
    assert _client(http_stub.url, sleeps=sleeps, backoff=0.1).send_text(CONFIG, "u1", "hi") == SENT_OK
    assert http_stub.paths() == ["/cgi-bin/gettoken"] + ["/cgi-bin/message/send"] * 3
    assert sleeps == pytest.approx([0.1, 0.2])


def test_5xx_retries_are_bounded(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(500, json.dumps({"errcode": -1, "errmsg": "system busy"}))
    sleeps = Sleeps()
    with pytest.raises(WeComApiError, match="^wecom send message failed: http=500 code=-1 msg=system busy$"):
        _client(http_stub.url, sleeps=sleeps).send_text(CONFIG, "u1", "hi")
    assert len(http_stub.requests) == 1 + 3
    assert len(sleeps) == 2


def test_network_errors_are_retried_then_reported_without_secrets(closed_port_url) -> None:
    sleeps = Sleeps()
    with pytest.raises(WeComApiError) as caught:
        _client(closed_port_url, sleeps=sleeps).send_text(CONFIG, "u1", "hi")
    assert str(caught.value) == "wecom get token failed: network error (ConnectionError)"
    assert "s/" not in str(caught.value) and caught.value.http_status is None
    assert len(sleeps) == 2


def test_read_timeout_on_token_fetch_is_retried(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK, delay=0.5)
    http_stub.reply(200, TOKEN_OK)
    client = _client(http_stub.url, read_timeout=0.1)
    assert client.get_access_token("corp", "secret") == "tok+/=1"
    assert len(http_stub.requests) == 2


def test_read_timeout_on_send_is_not_retried(http_stub) -> None:
    http_stub.reply(200, TOKEN_OK)
    http_stub.reply(200, SENT_OK, delay=0.5)
    client = _client(http_stub.url, read_timeout=0.1)
    with pytest.raises(WeComApiError, match=r"^wecom send message failed: network error \(ReadTimeout\)$"):
        client.send_text(CONFIG, "u1", "hi")
    assert http_stub.paths() == ["/cgi-bin/gettoken", "/cgi-bin/message/send"]
