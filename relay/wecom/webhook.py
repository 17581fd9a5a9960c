"""The generic result webhook (``RESULT_WEBHOOK_URL``, §6.2 step 2).

The body is the reference's ``{"userId","status","summary"}`` with the raw summary. Unlike the
reference (§13 item 24) the call has timeouts and bounded retries, and a non-2xx reply is a
failure rather than a success.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import requests

from relay.wecom.api import RetryPolicy, json_body, send_with_retries


@dataclass(frozen=True)
class WebhookResult:
    """A delivered webhook: the final HTTP status and how many requests it took."""

    status_code: int
    attempts: int


class WebhookError(RuntimeError):
    """The webhook was not delivered; ``status_code`` is None after a network failure."""

    def __init__(self, message: str, *, status_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def post_result_webhook(
    url: str,
    user_id: str,
    status: str,
    summary: str,
    *,
    session: Optional[requests.Session] = None,
    policy: RetryPolicy = RetryPolicy(),
) -> WebhookResult:
    """POST the result; raises ``WebhookError`` unless the final reply is 2xx.

    Connection failures and 5xx replies are retried; a read timeout is not, since the receiver
    may already have acted on the result.
    """
    body = json_body({"userId": user_id, "status": status, "summary": summary})
    owned = session is None
    client = session or requests.Session()
    try:
        response, attempts = send_with_retries(
            client,
            "POST",
            url,
            policy,
            idempotent=False,
            data=body,
            headers={"content-type": "application/json"},
        )
    except requests.RequestException as exc:
        # The URL may embed a secret, so only the exception type is reported.
        raise WebhookError(f"result webhook failed: network error ({type(exc).__name__})") from exc
    finally:
        if owned:
            client.close()
    response.close()
    if not 200 <= response.status_code < 300:
        raise WebhookError(
            f"result webhook failed: http={response.status_code} after {attempts} attempt(s)",
            status_code=response.status_code,
        )
    return WebhookResult(status_code=response.status_code, attempts=attempts)
