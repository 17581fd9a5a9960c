"""``GET /openapi.json``: an OpenAPI 3.0 description of the relay's HTTP API, no auth.

It describes what the routes accept and every status they answer, so a client can be generated
from it and ``tests/fuzz/test_openapi_live.py`` can run schemathesis against a live relay. The
callback is listed under each configured path (``WECOM_CALLBACK_PATH`` and the default). The agent
channel (``/agent``) is a WebSocket and is described in docs/security.md, not here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response

from relay.routes.app_context import current_relay
from relay.routes.responses import json_response

openapi_blueprint = Blueprint("openapi", __name__)

JSON = "application/json"
Schema = dict[str, Any]


def _json(schema: Schema) -> Schema:
    return {JSON: {"schema": schema}}


def _error(*codes: str) -> Schema:
    """``{"error": "<code>"}``, the relay's own error shape."""
    code: Schema = {"type": "string"}
    if codes:
        code["enum"] = list(codes)
    return {"type": "object", "required": ["error"], "properties": {"error": code}}


FASTIFY_ERROR: Schema = {
    "type": "object", "required": ["statusCode", "error", "message"],
    "properties": {"statusCode": {"type": "integer"}, "code": {"type": "string"}, "error": {"type": "string"},
                   "message": {"type": "string"}},
}
ERROR_OR_FASTIFY: Schema = {"oneOf": [_error(), FASTIFY_ERROR]}
ANY_OBJECT: Schema = {"type": "object", "additionalProperties": True}
ITEMS: Schema = {"type": "object", "required": ["items"],
                 "properties": {"items": {"type": "array", "items": ANY_OBJECT}}}


def _response(description: str, content: Schema | None = None, **headers: Schema) -> Schema:
    response: Schema = {"description": description}
    if content is not None:
        response["content"] = content
    if headers:
        response["headers"] = {name.replace("_", "-"): {"schema": schema} for name, schema in headers.items()}
    return response


UNAUTHORIZED = _response("Admin token missing or wrong", _json(_error("unauthorized_admin_request")))
UNAVAILABLE = _response("The store cannot be reached and this phase has no fallback to memory (Retry-After: 1)",
                        _json(_error("store_unavailable")), Retry_After={"type": "string"})
BODY_ERRORS = {
    "400": _response("Body is not valid JSON, or an invalid id or field", _json(ERROR_OR_FASTIFY)),
    "413": _response("Body over RELAY_MAX_BODY_BYTES", _json(FASTIFY_ERROR)),
    "415": _response("Content type not accepted", _json(FASTIFY_ERROR)),
}


def _query(name: str, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": description}


def _admin(summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"summary": summary, "security": [{"adminToken": []}],
            "responses": {**responses, "401": UNAUTHORIZED}, **extra}


COMMAND_ID = {"name": "commandId", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "At most 128 characters, no control or format characters (else 400 invalid_command_id)"}
USER_BODY = {"required": False, "content": _json({"type": "object", "properties": {"userId": {"type": "string"}}})}


def _command_action(summary: str, ok: str, *errors: str) -> Schema:
    return _admin(summary, {
        "200": _response(ok, _json(ANY_OBJECT)),
        **BODY_ERRORS,
        **{status: _response(code, _json(_error(code))) for status, code in errors},
        "503": UNAVAILABLE,
    }, parameters=[COMMAND_ID], requestBody=USER_BODY)


def _callback_operations() -> Schema:
    signature_query = [_query("msg_signature", "WeCom signature (encrypted form and URL verification)"),
                       _query("timestamp", "Epoch seconds of the signature; must be within "
                                           "WECOM_TIMESTAMP_TOLERANCE_S of now"),
                       _query("nonce", "Signature nonce")]
    callback_body = {"type": "object", "properties": {
        name: {"type": "string"} for name in
        ("msgId", "userId", "machineId", "text", "fromUserName", "toUserName", "encrypt", "xml", "payload", "body")
    } | {"message": ANY_OBJECT}}
    return {
        "get": {
            "summary": "WeCom URL verification: echoes (or decrypts) echostr",
            "parameters": [_query("echostr", "The challenge"), *signature_query],
            "responses": {
                "200": _response("The echostr, decrypted when an AES key is configured",
                                 {"text/plain": {"schema": {"type": "string"}}}),
                "400": _response("echostr missing or undecryptable, or signature fields incomplete",
                                 _json(_error("missing_echostr", "invalid_echostr", "missing_signature_fields"))),
                "401": _response("Bad or stale signature", _json(_error("invalid_signature", "stale_timestamp"))),
            },
        },
        "post": {
            "summary": "An inbound message: JSON, WeCom XML (plain or encrypted) or a form carrying XML",
            "parameters": [*signature_query,
                           _query("signature", "Plaintext-mode signature of token, timestamp and nonce"),
                           {"name": "x-callback-secret", "in": "header", "required": False,
                            "schema": {"type": "string"},
                            "description": "CALLBACK_SHARED_SECRET, needed on callbacks WeCom did not sign"}],
            "requestBody": {"required": False, "content": {
                JSON: {"schema": callback_body},
                "application/xml": {"schema": {"type": "string"}},
                "text/xml": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
                "application/x-www-form-urlencoded": {"schema": {
                    "type": "object", "additionalProperties": {"type": "string"}}},
            }},
            "responses": {
                "200": _response("The ack: JSON, a passive XML reply (plain or encrypted) or the text 'success'", {
                    JSON: {"schema": ANY_OBJECT}, "application/xml": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}}}),
                **BODY_ERRORS,
                "401": _response("Bad or stale signature, or the shared secret missing", _json(_error(
                    "invalid_signature", "stale_timestamp", "unauthorized_callback"))),
                "403": _response("User not allowed, or machine binding mismatch",
                                 _json(_error("user_not_allowed", "machine_binding_mismatch"))),
                "429": _response("Rate limited", _json(_error("rate_limited"))),
                "500": _response("Encrypted XML callback while WECOM_CORP_ID is missing (reference behaviour)",
                                 _json(_error("missing_wecom_encrypted_reply_config"))),
                "503": UNAVAILABLE,
            },
        },
    }


def build_openapi(callback_routes: Sequence[str]) -> Schema:
    """The document for a relay serving the callback on ``callback_routes``."""
    limit = _query("limit", "Items to return (JavaScript Number(); default 50)")
    paths: Schema = {
        "/healthz": {"get": {"summary": "Liveness", "responses": {
            "200": _response("Always", _json({"type": "object", "properties": {"status": {"type": "string"}}}))}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": _response("OpenAPI 3.0", _json(ANY_OBJECT))}}},
        "/metrics": {"get": _admin("Counts and store health (reference shape)", {
            "200": _response("Metrics", _json(ANY_OBJECT)), "503": UNAVAILABLE})},
        "/metrics/prometheus": {"get": _admin("Store metrics in Prometheus text format", {
            "200": _response("Exposition", {"text/plain": {"schema": {"type": "string"}}}), "503": UNAVAILABLE})},
        "/ops/config": {"get": _admin("Redacted configuration", {"200": _response("Configuration", _json(ANY_OBJECT))})},
        "/machines": {"get": _admin("Machine records", {"200": _response("Machines", _json(ITEMS)),
                                                        "503": UNAVAILABLE})},
        "/inflight": {"get": _admin("Commands waiting for their agent", {"200": _response("In flight", _json(ITEMS)),
                                                                         "503": UNAVAILABLE})},
        "/audit/recent": {"get": _admin("Newest audit records", {
            "200": _response("Records", _json(ITEMS)), "503": UNAVAILABLE},
            parameters=[limit, _query("userId", "Filter"), _query("machineId", "Filter"), _query("status", "Filter")])},
        "/commands/{commandId}": {"get": _admin("One command's audit record", {
            "200": _response("The record", _json(ANY_OBJECT)),
            "400": _response("Invalid command id", _json(_error("invalid_command_id"))),
            "404": _response("Unknown command", _json(_error("command_not_found"))),
            "503": UNAVAILABLE}, parameters=[COMMAND_ID])},
        "/commands/{commandId}/cancel": {"post": _command_action(
            "Ask the agent to cancel a command in flight", "cancel_sent",
            ("403", "cancel_not_authorized"), ("404", "command_not_inflight"), ("409", "machine_offline"))},
        "/commands/{commandId}/retry": {"post": _command_action(
            "Send a command again, as a new command", "retried_sent",
            ("403", "retry_not_authorized"), ("404", "command_not_found_for_retry"), ("409", "machine_offline"))},
        "/ops/store": {"get": _admin("Store phases, health, copies and counts per domain", {
            "200": _response("Store status", _json(ANY_OBJECT))})},
        "/ops/store/flags": {"put": _admin("Change store flags at runtime", {
            "200": _response("Applied", _json(ANY_OBJECT)),
            **BODY_ERRORS,
            "400": _response("Refused as a whole", _json(ERROR_OR_FASTIFY))},
            requestBody={"required": False, "content": _json({"type": "object", "additionalProperties": {
                "nullable": True, "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}})})},
        "/ops/store/mismatches": {"get": _admin("Shadow-compare mismatch sample", {
            "200": _response("Mismatches", _json(ITEMS))})},
        "/ops/store/reconcile/{domain}": {"get": _admin("Compare (and repair) one domain across backends", {
            "200": _response("Report", {JSON: {"schema": ANY_OBJECT},
                                        "application/x-ndjson": {"schema": {"type": "string"}}}),
            "400": _response("Bad query", _json(_error())),
            "404": _response("Unknown domain", _json(_error("unknown_domain"))),
            "409": _response("No Redis configured", _json(_error("redis_not_configured"))),
            "503": UNAVAILABLE},
            parameters=[{"name": "domain", "in": "path", "required": True, "schema": {"type": "string"}},
                        _query("repair", "0 or 1"), _query("limit", "Differing keys listed"),
                        _query("progress", "1 for NDJSON progress lines")])},
        "/ops/store/inventory": {"get": _admin("Key counts and memory per domain and backend", {
            "200": _response("Inventory", {JSON: {"schema": ANY_OBJECT},
                                           "application/x-ndjson": {"schema": {"type": "string"}}}),
            "400": _response("Bad query", _json(_error())),
            "503": UNAVAILABLE},
            parameters=[_query("sample", "Keys sampled for memory usage"),
                        _query("progress", "1 for NDJSON progress lines")])},
        "/ops/dashboard": {"get": {"summary": "The operator page (admin token in ?token=)",
                                   "parameters": [_query("token", "The admin token")],
                                   "responses": {"200": _response("HTML", {"text/html": {"schema": {"type": "string"}}}),
                                                 "401": UNAUTHORIZED}}},
    }
    for path in callback_routes:
        paths[path] = _callback_operations()
    return {
        "openapi": "3.0.3",
        "info": {"title": "CodexBridge relay", "version": "1",
                 "description": "The relay's HTTP API. Admin routes need the x-admin-token header "
                                "when RELAY_ADMIN_TOKEN is set."},
        "paths": paths,
        "components": {"securitySchemes": {
            "adminToken": {"type": "apiKey", "in": "header", "name": "x-admin-token"}}},
    }


@openapi_blueprint.get("/openapi.json")
def openapi() -> Response:
    return json_response(200, build_openapi(current_relay().settings.callback_routes))
