"""WeCom "send application message" client (§6.4), plus the HTTP retry policy the result webhook
shares.

Differences from the reference, all from §13 item 24: explicit connect/read timeouts, bounded
retries with jitter on network errors and 5xx replies, and an access-token cache keyed by
(corpId, secret) instead of one global token. Error messages keep the reference's format
(``... failed: http=<status> code=<errcode> msg=<errmsg>``), which ``analyze_push_failure`` parses.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import quote

import requests

from relay.jsontext import parse_strict
from relay.messages import utf16_slice

DEFAULT_BASE_URL = "https://qyapi.weixin.qq.com"
TOKEN_REFRESH_MARGIN_S = 30.0
DEFAULT_TOKEN_TTL_S = 7200
MESSAGE_MAX_UTF16_UNITS = 1900
NON_JSON_PREVIEW_UNITS = 160
#: errcodes meaning "this access token is invalid or expired": refetch it and resend once.
TOKEN_ERRCODES = frozenset({40014, 42001, 40001})

_URI_COMPONENT_SAFE = "!~*'()"  # what encodeURIComponent leaves alone besides alphanumerics and -_.


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and bounded retries for one outbound HTTP call.

    ``max_retries`` counts extra attempts (2 means at most 3 requests). The delay before retry
    ``n`` (0-based) is ``backoff * 2**n`` scaled by a jitter factor in [0.5, 1.5).
    """

    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    max_retries: int = 2
    backoff: float = 0.2
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    def delay(self, retry: int) -> float:
        return self.backoff * (2**retry) * (0.5 + self.jitter())


def _retryable(exc: requests.RequestException, idempotent: bool) -> bool:
    """Connection failures never reached the server, so they are always safe to retry. A read
    timeout may mean the server already acted, so it is retried only for idempotent calls."""
    if isinstance(exc, requests.ConnectionError):
        return True
    return idempotent and isinstance(exc, requests.Timeout)


def send_with_retries(
    session: requests.Session,
    method: str,
    url: str,
    policy: RetryPolicy,
    *,
    idempotent: bool,
    **kwargs: Any,
) -> tuple[requests.Response, int]:
    """The response (the last one if every attempt got a 5xx) and the number of attempts.

    Raises the last ``requests.RequestException`` when the network fails on every attempt.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            response = session.request(method, url, timeout=policy.timeout, **kwargs)
        except requests.RequestException as exc:
            if attempt > policy.max_retries or not _retryable(exc, idempotent):
                raise
        else:
            if response.status_code < 500 or attempt > policy.max_retries:
                return response, attempt
            response.close()
        policy.sleep(policy.delay(attempt - 1))


def json_body(payload: Any) -> bytes:
    """``JSON.stringify`` bytes: compact, non-ASCII kept as UTF-8 (lone surrogates escaped)."""
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode("ascii")


def js_string(value: Any) -> str:
    """How a JS template literal prints a parsed JSON value (``undefined`` for a missing one)."""
    if value is None:
        return "undefined"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return "[object Object]"
    if isinstance(value, list):
        return ",".join("" if item is None else js_string(item) for item in value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_zero(value: Any) -> bool:
    return _is_number(value) and value == 0


def parse_wecom_reply(response: requests.Response) -> dict[str, Any]:
    """The reply body as a dict: empty → ``{}``, non-JSON → errcode -1 with a preview."""
    text = response.content.decode("utf-8", "replace")
    if not text:
        return {}
    try:
        data = parse_strict(text)
    except ValueError:
        return {"errcode": -1, "errmsg": f"non_json_response: {utf16_slice(text, NON_JSON_PREVIEW_UNITS)}"}
    return data if isinstance(data, dict) else {}


class WeComApiError(RuntimeError):
    """A failed token fetch or message send; ``http_status`` and ``errcode`` are None after a
    network failure."""

    def __init__(
        self,
        message: str,
        *,
        http_status: Optional[int] = None,
        errcode: Any = None,
        errmsg: Any = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.errcode = errcode
        self.errmsg = errmsg


@dataclass(frozen=True)
class WeComApiConfig:
    """The app a message is sent as: ``WECOM_CORP_ID``, ``WECOM_AGENT_SECRET``, ``WECOM_AGENT_ID``."""

    corp_id: str
    agent_secret: str
    agent_id: int


@dataclass(frozen=True)
class _CachedToken:
    token: str
    expires_at: float


class WeComApiClient:
    """Sends text messages through the WeCom API, caching one access token per (corpId, secret).

    Safe to share between threads. ``clock`` returns seconds (monotonic by default).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        session: Optional[requests.Session] = None,
        policy: RetryPolicy = RetryPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = session or requests.Session()
        self._policy = policy
        self._clock = clock
        self._tokens: dict[tuple[str, str], _CachedToken] = {}
        self._lock = threading.Lock()

    def _url(self, path: str, **query: str) -> str:
        encoded = "&".join(f"{key}={quote(value, safe=_URI_COMPONENT_SAFE)}" for key, value in query.items())
        return f"{self._base_url}{path}?{encoded}"

    def _call(self, what: str, method: str, url: str, *, idempotent: bool, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        try:
            response, _ = send_with_retries(self._session, method, url, self._policy, idempotent=idempotent, **kwargs)
        except requests.RequestException as exc:
            # The URL carries the secret or the token, so only the exception type is reported.
            raise WeComApiError(f"wecom {what} failed: network error ({type(exc).__name__})") from exc
        with response:
            return response.status_code, parse_wecom_reply(response)

    def get_access_token(self, corp_id: str, secret: str) -> str:
        """A cached token while it has more than 30 s left, else a fresh one."""
        key = (corp_id, secret)
        now = self._clock()
        with self._lock:
            cached = self._tokens.get(key)
        if cached and cached.expires_at > now + TOKEN_REFRESH_MARGIN_S:
            return cached.token
        url = self._url("/cgi-bin/gettoken", corpid=corp_id, corpsecret=secret)
        status, data = self._call("get token", "GET", url, idempotent=True)
        token = data.get("access_token")
        if not _is_zero(data.get("errcode")) or not isinstance(token, str) or not token:
            raise WeComApiError(
                f"wecom get token failed: http={status} code={js_string(data.get('errcode'))} "
                f"msg={js_string(data.get('errmsg'))}",
                http_status=status,
                errcode=data.get("errcode"),
                errmsg=data.get("errmsg"),
            )
        ttl = data.get("expires_in")
        if not _is_number(ttl):
            ttl = DEFAULT_TOKEN_TTL_S
        with self._lock:
            self._tokens[key] = _CachedToken(token, now + ttl)
        return token

    def invalidate_token(self, corp_id: str, secret: str) -> None:
        with self._lock:
            self._tokens.pop((corp_id, secret), None)

    def _post_message(self, token: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url = self._url("/cgi-bin/message/send", access_token=token)
        return self._call(
            "send message",
            "POST",
            url,
            idempotent=False,
            data=json_body(payload),
            headers={"content-type": "application/json"},
        )

    def send_text(self, config: WeComApiConfig, user_id: str, content: str) -> dict[str, Any]:
        """Send ``content`` (cut to 1900 UTF-16 units) to ``user_id``; returns WeCom's reply.

        A reply with errcode 0 is success even if it lists ``invaliduser``. An invalid-token
        errcode drops the cached token and resends once with a new one.
        """
        payload = {
            "touser": user_id,
            "msgtype": "text",
            "agentid": config.agent_id,
            "text": {"content": utf16_slice(content, MESSAGE_MAX_UTF16_UNITS)},
            "safe": 0,
            "enable_id_trans": 0,
            "enable_duplicate_check": 0,
        }
        token = self.get_access_token(config.corp_id, config.agent_secret)
        status, data = self._post_message(token, payload)
        errcode = data.get("errcode")
        if _is_number(errcode) and errcode in TOKEN_ERRCODES:
            self.invalidate_token(config.corp_id, config.agent_secret)
            token = self.get_access_token(config.corp_id, config.agent_secret)
            status, data = self._post_message(token, payload)
        if not _is_zero(data.get("errcode")):
            raise WeComApiError(
                f"wecom send message failed: http={status} code={js_string(data.get('errcode'))} "
                f"msg={js_string(data.get('errmsg'))}",
                http_status=status,
                errcode=data.get("errcode"),
                errmsg=data.get("errmsg"),
            )
        return data
