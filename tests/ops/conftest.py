"""A live relay on a real Redis for the ops tests, and the helpers they share.

``start_ops_relay(redis, phase=...)`` starts gunicorn (``tests/support/live_relay.py``) with an admin
token, one allow-listed user, the Redis of the session (flushed first) and a flags file in a temporary
directory. ``OpsRelay`` sends admin requests and callbacks and runs ``python -m relay.cli`` against it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import requests

from tests.support.live_relay import PROJECT_ROOT, LiveRelay, live_relay
from tests.support.redisproc import RedisServer

ADMIN = "ops-admin-token"
USER = "ops-user"
ADMIN_HEADERS = {"x-admin-token": ADMIN}
KEY_PREFIX = "codexbridge:dev"


@dataclass
class OpsRelay:
    relay: LiveRelay
    redis: RedisServer
    flags_file: Path

    @property
    def url(self) -> str:
        return self.relay.base_url

    def get(self, path: str) -> Any:
        reply = requests.get(self.relay.url(path), headers=ADMIN_HEADERS, timeout=10)
        reply.raise_for_status()
        return reply.json()

    def put_flags(self, changes: Mapping[str, Optional[str]]) -> Any:
        reply = requests.put(self.relay.url("/ops/store/flags"), json=dict(changes), headers=ADMIN_HEADERS,
                             timeout=10)
        reply.raise_for_status()
        return reply.json()

    def reset_flags(self, **flags: str) -> None:
        """Drop every runtime override, then set ``flags`` (the state a test starts from)."""
        current = self.get("/ops/store")["flags"]["overrides"]
        self.put_flags({**{name: None for name in current}, **flags})

    def phases(self) -> dict[str, Optional[str]]:
        return {d: e["flags"]["phase"] for d, e in self.get("/ops/store")["domains"].items()}

    def callback(self, text: str = "@dev status") -> str:
        """One accepted WeCom callback; returns its command id."""
        reply = requests.post(self.relay.url("/wecom/callback"), timeout=10, json={
            "msgId": uuid.uuid4().hex, "userId": USER, "text": text, "machineId": "ops-machine"})
        reply.raise_for_status()
        return reply.json()["commandId"]

    def traffic(self, callbacks: int = 20) -> list[str]:
        """Callbacks, then reads of their audit records (shadow comparisons) and of the lists."""
        ids = [self.callback() for _ in range(callbacks)]
        for command_id in ids:
            self.get(f"/commands/{command_id}")
        self.get("/audit/recent")
        self.get("/inflight")
        self.get("/machines")
        return ids

    def redis_value(self, key: str) -> str:
        """The raw value of ``key`` in Redis (it must exist)."""
        client = self.redis.client()
        try:
            value = client.get(key)
        finally:
            client.close()
        assert isinstance(value, str), f"{key} is not a string value in Redis"
        return value

    def cli_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "STORE_"))}
        env.update({"RELAY_URL": self.url, "RELAY_ADMIN_TOKEN": ADMIN, "PYTHONPATH": str(PROJECT_ROOT)})
        env.update(extra)
        return env

    def cli(self, *args: str, env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess[str]:
        """``python -m relay.cli ARGS`` against this relay (URL and token from the environment)."""
        return subprocess.run([sys.executable, "-m", "relay.cli", *args], cwd=PROJECT_ROOT,
                              env=self.cli_env(**(env or {})), capture_output=True, text=True, timeout=60)


@contextmanager
def start_ops_relay(redis: RedisServer, phase: str = "shadow", **env: str) -> Iterator[OpsRelay]:
    redis.resume()
    redis.start()
    client = redis.client()
    try:
        client.flushall()
    finally:
        client.close()
    with tempfile.TemporaryDirectory(prefix="ops-relay-") as tmp:
        flags_file = Path(tmp) / "store-flags.json"
        relay_env = {
            "RELAY_ADMIN_TOKEN": ADMIN, "ALLOWLIST_USERS": USER, "REDIS_URL": redis.url, "STORE_PHASE": phase,
            "STORE_FLAGS_FILE": str(flags_file), "AUDIT_LOG_PATH": "", "RATE_LIMIT_PER_MINUTE": "100000",
            "LOG_LEVEL": "WARNING", **env,
        }
        with live_relay(env=relay_env) as relay:
            yield OpsRelay(relay, redis, flags_file)
