"""Live: secrets, tokens and message text stay out of the logs and the ops views, and Redis is reached
with an ACL user and password from ``REDIS_URL``, over TLS (``rediss://``) too (docs/security.md)."""
from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cluster.harness import wait_for
from tests.support.live_relay import live_relay
from tests.support.redisproc import RedisServer, free_port

REDIS_USER = "relay-user"
REDIS_PASSWORD = "redis-password-4e1b9c"
SECRETS = {
    "RELAY_ADMIN_TOKEN": "admin-token-c0ffee42",
    "WECOM_TOKEN": "wecom-token-a1b2c3",
    "WECOM_ENCODING_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "WECOM_CORP_ID": "ww-corp-id-5d5d",
    "WECOM_AGENT_SECRET": "agent-secret-8f8f8f",
    "CALLBACK_SHARED_SECRET": "callback-secret-3c3c",
    "AGENT_AUTH_TOKEN": "agent-token-9a9a9a",
}
TEXT_MARKER = "private-message-text-61f0"
SUMMARY_MARKER = "private-result-summary-2d7e"
ADMIN = {"x-admin-token": SECRETS["RELAY_ADMIN_TOKEN"]}


@pytest.fixture
def acl_user(redis_server: RedisServer) -> Iterator[RedisServer]:
    with redis_server.client() as direct:
        direct.acl_setuser(REDIS_USER, enabled=True, passwords=[f"+{REDIS_PASSWORD}"], keys=["codexbridge:*"],
                           channels=["codexbridge:*"], commands=["+@all", "-@dangerous"])
    yield redis_server
    with redis_server.client() as direct:
        direct.acl_deluser(REDIS_USER)


def test_no_secret_token_or_message_text_in_logs_or_ops_views(acl_user: RedisServer, tmp_path: Path) -> None:
    dead_port = free_port()
    env = {**SECRETS, "REDIS_URL": f"redis://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{acl_user.port}/0",
           "STORE_PHASE": "redis-primary", "ALLOWLIST_USERS": "u1", "MACHINE_BINDINGS": "u1:box",
           "WECOM_AGENT_ID": "1000002", "WECOM_API_BASE_URL": f"http://127.0.0.1:{dead_port}",
           "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"), "LOG_LEVEL": "DEBUG"}
    with live_relay("wsgi:app", env=env) as relay:
        ws = websocket.create_connection(relay.agent_url, timeout=5)
        ws.send(json.dumps({"type": "agent.hello", "machineId": "box", "token": SECRETS["AGENT_AUTH_TOKEN"]}))
        assert wait_for(lambda: requests.get(relay.url("/machines"), headers=ADMIN, timeout=5).json()["items"])
        secret_header = {"x-callback-secret": SECRETS["CALLBACK_SHARED_SECRET"]}
        body = {"msgId": "leak-1", "userId": "u1", "text": f"@dev task {TEXT_MARKER}"}
        command_id = requests.post(relay.url("/wecom/callback"), json=body, headers=secret_header,
                                   timeout=5).json()["commandId"]
        ws.send(json.dumps({"type": "agent.result", "result": {
            "commandId": command_id, "machineId": "box", "status": "ok", "summary": SUMMARY_MARKER}}))
        # Failures that log: a result push to an unreachable WeCom, bad credentials of every kind.
        assert wait_for(lambda: "result_push_failed" in relay.logs(), timeout_s=20)
        requests.post(relay.url("/wecom/callback"), json={**body, "msgId": "leak-2"},
                      headers={"x-callback-secret": "wrong-" + TEXT_MARKER}, timeout=5)
        requests.get(relay.url("/metrics"), headers={"x-admin-token": "wrong-" + TEXT_MARKER}, timeout=5)
        bad = websocket.create_connection(relay.agent_url, timeout=5)
        bad.send(json.dumps({"type": "agent.hello", "machineId": "box2", "token": "wrong-" + TEXT_MARKER}))
        time.sleep(0.5)
        bad.close()
        ws.close()
        views = {path: requests.get(relay.url(path), headers=ADMIN, timeout=5).text
                 for path in ("/ops/config", "/ops/store", "/metrics", "/metrics/prometheus")}
        logs = relay.logs()
    assert "agent_auth_failed" in logs and "result_push_failed" in logs  # the failure paths did log
    for name, secret in {**SECRETS, "REDIS_PASSWORD": REDIS_PASSWORD}.items():
        assert secret not in logs, f"{name} in the logs"
        for path, text in views.items():
            assert secret not in text, f"{name} in {path}"
    for marker in (TEXT_MARKER, SUMMARY_MARKER):
        assert marker not in logs
        assert marker not in views["/ops/config"]


# -- TLS -----------------------------------------------------------------------------------------------
def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, written as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
                    ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("relay test CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test CA")]),
                          ca_key, ca=True)
    server_cert = certificate("127.0.0.1", server_key, ca_cert.subject, ca_key, ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking TLS only, with the ACL user; yields its port and the CA file."""
    ca, cert, key = _certificates(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--user", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port, ca
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_rediss_with_an_acl_user_serves_the_relay(tls_redis: tuple[int, Path], tmp_path: Path) -> None:
    port, ca = tls_redis
    url = f"rediss://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    env = {"REDIS_URL": url, "STORE_PHASE": "redis-primary", "RELAY_ADMIN_TOKEN": SECRETS["RELAY_ADMIN_TOKEN"],
           "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl")}
    with live_relay("wsgi:app", env=env) as relay:
        ws = websocket.create_connection(relay.agent_url, timeout=5)
        ws.send(json.dumps({"type": "agent.hello", "machineId": "tls-box"}))
        assert wait_for(lambda: requests.get(relay.url("/machines"), headers=ADMIN, timeout=5).json()["items"])
        reply = requests.post(relay.url("/wecom/callback"), timeout=5,
                              json={"msgId": "tls-1", "userId": "u1", "machineId": "tls-box", "text": "@dev task x"})
        assert reply.json()["status"] == "sent_to_agent"
        store = requests.get(relay.url("/ops/store"), headers=ADMIN, timeout=5).json()
        ws.close()
        logs = relay.logs()
    assert store["degraded"] is False and store["redis"]["reachable"] is True
    assert REDIS_PASSWORD not in logs
    direct = redis.Redis.from_url(url, decode_responses=True)
    try:
        assert direct.exists("codexbridge:dev:idempotency:tls-1")
        assert direct.acl_whoami() == REDIS_USER
    finally:
        direct.close()
