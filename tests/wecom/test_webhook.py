"""The result webhook against a local stub server: the reference's body, non-2xx as failure, and
bounded retries with timeouts (§6.2 step 2, fixing §13 item 24)."""
from __future__ import annotations

import pytest
import requests

from relay.wecom.api import RetryPolicy
from relay.wecom.webhook import WebhookError, WebhookResult, post_result_webhook


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _policy(sleeps: Sleeps | None = None, **overrides: float) -> RetryPolicy:
    return RetryPolicy(sleep=sleeps if sleeps is not None else Sleeps(), jitter=lambda: 0.5, **overrides)


def test_posts_the_reference_body(http_stub) -> None:
    http_stub.reply(204)
    result = post_result_webhook(f"{http_stub.url}/hook?k=1", "u1", "ok", "补丁已生成\nline 2", policy=_policy())
    assert result == WebhookResult(status_code=204, attempts=1)
    (request,) = http_stub.requests
    assert (request.method, request.path, request.query) == ("POST", "/hook", {"k": ["1"]})
    assert request.headers["content-type"] == "application/json"
    assert request.body == '{"userId":"u1","status":"ok","summary":"补丁已生成\\nline 2"}'.encode("utf-8")


def test_uses_a_given_session(http_stub) -> None:
    http_stub.reply(200)
    with requests.Session() as session:
        assert post_result_webhook(http_stub.url, "u1", "ok", "s", session=session, policy=_policy()).attempts == 1


def test_5xx_is_retried(http_stub) -> None:
    http_stub.reply(500)
    http_stub.reply(503)
    http_stub.reply(200)
    sleeps = Sleeps()
    assert post_result_webhook(http_stub.url, "u1", "ok", "s", policy=_policy(sleeps, backoff=0.1)).attempts == 3
    assert sleeps == pytest.approx([0.1, 0.2])


def test_5xx_retries_are_bounded(http_stub) -> None:
    http_stub.reply(500)
    with pytest.raises(WebhookError, match=r"^result webhook failed: http=500 after 3 attempt\(s\)$") as caught:
        post_result_webhook(http_stub.url, "u1", "ok", "s", policy=_policy())
    assert caught.value.status_code == 500
    assert len(http_stub.requests) == 3


@pytest.mark.parametrize("status", [301, 400, 404])
def test_non_2xx_is_a_failure_without_retry(http_stub, status: int) -> None:
    http_stub.reply(status)
    with pytest.raises(WebhookError) as caught:
        post_result_webhook(http_stub.url, "u1", "ok", "s", policy=_policy())
    assert caught.value.status_code == status
    assert len(http_stub.requests) == 1


def test_network_errors_are_retried_then_raised(closed_port_url) -> None:
    sleeps = Sleeps()
    with pytest.raises(WebhookError, match=r"^result webhook failed: network error \(ConnectionError\)$") as caught:
        post_result_webhook(f"{closed_port_url}/hook?secret=s3", "u1", "ok", "s", policy=_policy(sleeps))
    assert caught.value.status_code is None
    assert len(sleeps) == 2


def test_read_timeout_is_not_retried(http_stub) -> None:
    http_stub.reply(200, delay=0.5)
    with pytest.raises(WebhookError, match=r"network error \(ReadTimeout\)"):
        post_result_webhook(http_stub.url, "u1", "ok", "s", policy=_policy(read_timeout=0.1))
    assert len(http_stub.requests) == 1
