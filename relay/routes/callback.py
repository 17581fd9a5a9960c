"""The WeCom callback routes: GET URL verification and POST inbound messages (reference §2.10-2.12).

Both are served on every path of ``settings.callback_routes``. The wire rules live in
``relay.routes.wecom_io``; this module only reads the request and asks the lifecycle.
Deliberate changes from the reference (see ``wecom_io``): an undecryptable echostr is a
400 ``invalid_echostr`` and an undecryptable ``Encrypt`` a 400
``invalid_encrypted_payload``, where the reference answered Fastify's 500; signatures are
checked on every form that carries one, with timestamp freshness; callbacks WeCom did not
sign need ``CALLBACK_SHARED_SECRET`` when it is set; ids must be valid (``relay.ids``).
"""
from __future__ import annotations

from collections.abc import Sequence

from flask import Blueprint, Response

from relay.routes.app_context import current_relay, current_request, query_dict
from relay.routes.body import read_body
from relay.routes.wecom_io import (
    CALLBACK_SECRET_HEADER,
    CallbackRejected,
    check_ids,
    check_unsigned_callback,
    inbound_from_body,
    render_ack,
    verify_url,
)

SIGNATURE_QUERY = ("msg_signature", "timestamp", "nonce")


def verify() -> Response:
    relay = current_relay()
    config = relay.crypto_config
    return verify_url(query_dict("echostr", *SIGNATURE_QUERY), config, relay.clock() // 1000).to_response()


def receive() -> Response:
    relay = current_relay()
    config = relay.crypto_config
    body = read_body(relay.settings.max_body_bytes)
    query = query_dict(*SIGNATURE_QUERY, "signature")
    now_s = relay.clock() // 1000
    try:
        msg = inbound_from_body(body, query, config, now_s)
        if not msg.encrypted:
            check_unsigned_callback(query, current_request().headers.get(CALLBACK_SECRET_HEADER), config, now_s)
        check_ids(msg)
    except CallbackRejected as rejected:
        return rejected.rendered().to_response()
    ack = relay.lifecycle.handle_inbound(msg)
    return render_ack(ack, msg, config, relay.clock(), relay.crypto_random).to_response()


def make_callback_blueprint(routes: Sequence[str]) -> Blueprint:
    """GET and POST on each path (already normalised, reference §2.10).

    Paths are literal: a ``<`` or ``>`` (Werkzeug's converter syntax) is refused.
    """
    blueprint = Blueprint("wecom_callback", __name__)
    for path in routes:
        if "<" in path or ">" in path:
            raise ValueError(f"callback path {path!r} may not contain '<' or '>'")
        blueprint.add_url_rule(path, "verify", verify, methods=["GET"])
        blueprint.add_url_rule(path, "receive", receive, methods=["POST"])
    return blueprint
