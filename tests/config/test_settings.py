"""Startup configuration: reference names and defaults, and refusal of bad values."""
from __future__ import annotations

import pytest

from config.settings import ConfigError, load_settings, parse_machine_bindings


def test_reference_defaults() -> None:
    s = load_settings({})
    assert (s.relay_host, s.relay_port) == ("0.0.0.0", 8787)
    assert s.allowlist == frozenset() and dict(s.machine_bindings) == {}
    assert s.callback_routes == ("/wecom/callback",)
    assert s.audit_log_path == "audit/relay-command-events.jsonl" and s.audit_max_records == 2000
    assert (s.machine_heartbeat_timeout_ms, s.machine_ttl_ms) == (45000, 90000)
    assert (s.inflight_command_timeout_ms, s.inflight_ttl_ms) == (900000, 1800000)
    assert (s.command_template_ttl_ms, s.command_template_max, s.command_fingerprint_ttl_ms) == (86400000, 5000, 15000)
    assert s.store_backend == "memory" and s.wecom_passive_reply is True and s.admin_token is None
    assert s.store_app == "codexbridge" and s.store_env == "dev"
    assert s.redis_multiplex is True


@pytest.mark.parametrize("name, value", [
    ("RELAY_PORT", "1e3"), ("RELAY_PORT", "0x10"), ("RELAY_PORT", "70000"),
    ("MACHINE_HEARTBEAT_TIMEOUT_MS", "abc"), ("INFLIGHT_COMMAND_TIMEOUT_MS", "0"),
    ("REDIS_MACHINE_TTL_MS", "1500.5"), ("AUDIT_MAX_RECORDS", "-1"), ("STORE_BACKEND", "postgres"),
    ("WECOM_ENCODING_AES_KEY", "too-short"), ("REDIS_SOCKET_TIMEOUT_MS", "nan"), ("LOG_LEVEL", "loud"),
    ("STORE_ENV", "Prod!"), ("WECOM_AGENT_ID", "12a"), ("RELAY_THREADS", "2"),
    ("RELAY_CONNECTIONS", "many"), ("RELAY_WORKER_CLASS", "eventlet"), ("REDIS_MULTIPLEX", "sometimes"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert name in str(info.value) and "accepts" in str(info.value)


def test_empty_values_mean_unset_except_where_empty_means_something() -> None:
    s = load_settings({"MACHINE_HEARTBEAT_TIMEOUT_MS": "", "AUDIT_LOG_PATH": "", "WECOM_TOKEN": "  "})
    assert s.machine_heartbeat_timeout_ms == 45000
    assert s.audit_log_path == ""
    assert s.wecom_token is None
    assert load_settings({"RELAY_ADMIN_TOKEN": "__SET_IN_USER_ENV__"}).admin_token is None


def test_legacy_store_variables_keep_working() -> None:
    assert load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}).store_backend == "redis"
    s = load_settings({"REDIS_URL": "redis://h:1", "STORE_MODE": "memory"})
    assert s.store_backend == "memory"
    s = load_settings({"REDIS_URL": "redis://h:1", "STORE_MODE": "redis", "AUDIT_INDEX_MODE": "memory",
                       "REDIS_PREFIX": "myapp:"})
    assert s.plans["audit"].backend == "memory" and s.plans["inflight"].backend == "redis"
    assert s.store_app == "myapp"
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load_settings({"STORE_MODE": "redis"})


def test_relay_connections_bound_the_agents_and_relay_threads_is_its_former_name() -> None:
    assert load_settings({}).relay_connections == 1024
    assert load_settings({"RELAY_THREADS": "64"}).relay_connections == 64
    assert load_settings({"RELAY_THREADS": "64", "RELAY_CONNECTIONS": "128"}).relay_connections == 128
    # a reserve of connections stays free for HTTP requests
    assert load_settings({"RELAY_CONNECTIONS": "128"}).max_agent_connections == 120


def test_several_workers_need_redis_authority() -> None:
    with pytest.raises(ConfigError, match="RELAY_WORKERS.*process memory"):
        load_settings({"RELAY_WORKERS": "2"})
    assert load_settings({"RELAY_WORKERS": "2", "STORE_BACKEND": "redis", "REDIS_URL": "redis://h:1"}).relay_workers == 2


def test_machine_bindings_allow_colons_in_machine_ids() -> None:
    assert parse_machine_bindings(" u1 : m1 ,u2:host:1,bad, :x,u1:m3") == {"u1": "m3", "u2": "host:1"}


def test_callback_path_is_normalised() -> None:
    s = load_settings({"WECOM_CALLBACK_PATH": " custom//path/?q=1"})
    assert s.callback_routes == ("/custom/path", "/wecom/callback")


def test_agent_idle_timeout_must_exceed_ping_interval() -> None:
    with pytest.raises(ConfigError, match="AGENT_IDLE_TIMEOUT_MS"):
        load_settings({"AGENT_PING_INTERVAL_MS": "5000", "AGENT_IDLE_TIMEOUT_MS": "5000"})
