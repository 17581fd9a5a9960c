"""Live: under gunicorn's gevent worker the relay's round trips go over the shared connection
(``REDIS_MULTIPLEX``, on by default), and ``/ops/store`` says so; off, each takes a pooled one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from tests.support.live_relay import live_relay
from tests.support.one_command import serve_one_command
from tests.support.redisproc import RedisServer

ADMIN = {"x-admin-token": "multiplex-admin"}


@pytest.mark.parametrize("setting, shared", [(None, True), ("false", False)])
def test_the_worker_s_round_trips_share_one_connection_unless_turned_off(
        redis_server: RedisServer, tmp_path: Path, setting: Optional[str], shared: bool) -> None:
    env = {"REDIS_URL": redis_server.url, "STORE_PHASE": "redis-primary", "RELAY_ADMIN_TOKEN": "multiplex-admin",
           "ALLOWLIST_USERS": "u1", "AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"),
           **({"REDIS_MULTIPLEX": setting} if setting else {})}
    with live_relay("wsgi:app", env=env) as relay:
        _, store = serve_one_command(relay, "shared-box", "shared-1", ADMIN)
    counts = store["redis"]["sharedConnection"]
    if shared:
        # At least the callback's two round trips and the result's three.
        assert counts is not None and counts["roundTrips"] >= 5 and 1 <= counts["writes"] <= counts["roundTrips"]
    else:
        assert counts is None
