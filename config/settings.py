"""Settings from the environment, validated once at startup.

Every variable of the reference relay keeps its name and default (reference §9);
where the reference silently accepted junk (NaN, empty strings, fractions), a bad
value stops startup with ``ConfigError`` naming the variable and what it accepts.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import marshmallow
from marshmallow import fields

from config.phases import DomainPlan, FlagError, resolve_plans
from config.redis_target import RedisTargetError, resolve_redis_url

PLACEHOLDER = "__SET_IN_USER_ENV__"
DEFAULT_CALLBACK_PATH = "/wecom/callback"
#: Simultaneous connections per gunicorn worker when neither RELAY_CONNECTIONS nor RELAY_THREADS is set.
DEFAULT_CONNECTIONS = 1024


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable(s)."""


def normalize_secret(value: Optional[str]) -> Optional[str]:
    """Reference "norm": trim; empty or the placeholder count as unset."""
    if value is None:
        return None
    value = value.strip()
    return None if not value or value == PLACEHOLDER else value


def normalize_callback_path(raw: Optional[str]) -> str:
    """``WECOM_CALLBACK_PATH`` as a route (reference §2.10); unset values give the default."""
    path = normalize_secret(raw) or ""
    if not path:
        return DEFAULT_CALLBACK_PATH
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path:
        return DEFAULT_CALLBACK_PATH
    if not path.startswith("/"):
        path = "/" + path
    path = re.sub(r"/+", "/", path)
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def callback_route_paths(raw: Optional[str]) -> list[str]:
    """Every path the callback is served on: the configured one and the default."""
    path = normalize_callback_path(raw)
    return [path] if path == DEFAULT_CALLBACK_PATH else [path, DEFAULT_CALLBACK_PATH]


# -- field types ---------------------------------------------------------------------------
class EnvBool(fields.Field):
    TRUE = {"1", "true", "yes", "on"}
    FALSE = {"0", "false", "no", "off"}
    default_error_messages = {"invalid": "accepts true/false, 1/0, yes/no, on/off"}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        text = str(value).strip().lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise self.make_error("invalid")


class EnvInt(fields.Field):
    """A whole number within bounds; rejects fractions, exponents, hex and blanks."""

    default_error_messages = {"invalid": "accepts a whole number {bounds}"}

    def __init__(self, minimum: int = 1, maximum: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def _bounds(self) -> str:
        if self.maximum is None:
            return f">= {self.minimum}"
        return f"from {self.minimum} to {self.maximum}"

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        text = str(value).strip()
        if not re.fullmatch(r"-?\d+", text):
            raise self.make_error("invalid", bounds=self._bounds())
        number = int(text)
        if number < self.minimum or (self.maximum is not None and number > self.maximum):
            raise self.make_error("invalid", bounds=self._bounds())
        return number


class EnvFloat(fields.Field):
    default_error_messages = {"invalid": "accepts a number from {lo} to {hi}"}

    def __init__(self, lo: float, hi: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lo, self.hi = lo, hi

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise self.make_error("invalid", lo=self.lo, hi=self.hi) from None
        if not (self.lo <= number <= self.hi):
            raise self.make_error("invalid", lo=self.lo, hi=self.hi)
        return number


class EnvChoice(fields.Field):
    default_error_messages = {"invalid": "accepts one of: {choices}"}

    def __init__(self, choices: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choices = choices

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = str(value).strip()
        if text not in self.choices:
            raise self.make_error("invalid", choices=", ".join(self.choices))
        return text


class EnvText(fields.Field):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        return str(value)


class EnvSegment(fields.Field):
    default_error_messages = {
        "invalid": "accepts lower-case letters, digits, '_' and '-', starting with a letter (max 64)"
    }

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = str(value).strip().rstrip(":")
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", text):
            raise self.make_error("invalid")
        return text


class EnvAesKey(fields.Field):
    default_error_messages = {"invalid": "accepts exactly 43 base64 characters (the WeCom EncodingAESKey)"}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Optional[str]:
        text = normalize_secret(str(value))
        if text is None:
            return None
        if not re.fullmatch(r"[A-Za-z0-9+/]{43}", text):
            raise self.make_error("invalid")
        return text


class EnvSchema(marshmallow.Schema):
    """One field per variable; ``data_key`` is the variable name."""

    class Meta:
        unknown = marshmallow.EXCLUDE

    relay_host = EnvText(data_key="RELAY_HOST", load_default="0.0.0.0")
    relay_port = EnvInt(1, 65535, data_key="RELAY_PORT", load_default=8787)
    allowlist_users = EnvText(data_key="ALLOWLIST_USERS", load_default="")
    machine_bindings = EnvText(data_key="MACHINE_BINDINGS", load_default="")
    wecom_token = EnvText(data_key="WECOM_TOKEN", load_default=None)
    wecom_encoding_aes_key = EnvAesKey(data_key="WECOM_ENCODING_AES_KEY", load_default=None)
    wecom_corp_id = EnvText(data_key="WECOM_CORP_ID", load_default=None)
    wecom_agent_secret = EnvText(data_key="WECOM_AGENT_SECRET", load_default=None)
    wecom_agent_id = EnvText(data_key="WECOM_AGENT_ID", load_default=None)
    wecom_callback_path = EnvText(data_key="WECOM_CALLBACK_PATH", load_default=None)
    wecom_passive_reply = EnvText(data_key="WECOM_PASSIVE_REPLY", load_default="")
    wecom_api_base_url = EnvText(data_key="WECOM_API_BASE_URL", load_default="https://qyapi.weixin.qq.com")
    admin_token = EnvText(data_key="RELAY_ADMIN_TOKEN", load_default=None)
    agent_auth_token = EnvText(data_key="AGENT_AUTH_TOKEN", load_default=None)
    agent_tokens = EnvText(data_key="AGENT_TOKENS", load_default="")
    callback_secret = EnvText(data_key="CALLBACK_SHARED_SECRET", load_default=None)
    wecom_timestamp_tolerance_s = EnvInt(0, 7 * 86400, data_key="WECOM_TIMESTAMP_TOLERANCE_S", load_default=300)
    result_webhook_url = EnvText(data_key="RESULT_WEBHOOK_URL", load_default=None)
    audit_log_path = EnvText(data_key="AUDIT_LOG_PATH", load_default="audit/relay-command-events.jsonl")
    audit_max_records = EnvInt(1, data_key="AUDIT_MAX_RECORDS", load_default=2000)
    audit_max_events_per_command = EnvInt(2, data_key="AUDIT_MAX_EVENTS_PER_COMMAND", load_default=200)
    machine_heartbeat_timeout_ms = EnvInt(1, data_key="MACHINE_HEARTBEAT_TIMEOUT_MS", load_default=45000)
    inflight_command_timeout_ms = EnvInt(1, data_key="INFLIGHT_COMMAND_TIMEOUT_MS", load_default=900000)
    command_template_ttl_ms = EnvInt(1, data_key="COMMAND_TEMPLATE_TTL_MS", load_default=86400000)
    command_template_max = EnvInt(1, data_key="COMMAND_TEMPLATE_MAX", load_default=5000)
    command_fingerprint_ttl_ms = EnvInt(1, data_key="COMMAND_FINGERPRINT_TTL_MS", load_default=15000)
    rate_limit_per_minute = EnvInt(1, data_key="RATE_LIMIT_PER_MINUTE", load_default=60)
    idempotency_ttl_ms = EnvInt(1, data_key="IDEMPOTENCY_TTL_MS", load_default=86400000)
    locale_ttl_ms = EnvInt(1, data_key="LOCALE_TTL_MS", load_default=30 * 86400000)
    sweep_interval_ms = EnvInt(100, data_key="SWEEP_INTERVAL_MS", load_default=60000)
    agent_ping_interval_ms = EnvInt(100, data_key="AGENT_PING_INTERVAL_MS", load_default=20000)
    agent_idle_timeout_ms = EnvInt(200, data_key="AGENT_IDLE_TIMEOUT_MS", load_default=60000)
    agent_max_message_bytes = EnvInt(1024, data_key="AGENT_MAX_MESSAGE_BYTES", load_default=16 * 1024 * 1024)
    max_body_bytes = EnvInt(1024, data_key="RELAY_MAX_BODY_BYTES", load_default=1024 * 1024)
    # Store selection. STORE_MODE is the reference's name for STORE_BACKEND.
    store_backend = EnvChoice(("memory", "redis"), data_key="STORE_BACKEND", load_default=None)
    store_mode = EnvText(data_key="STORE_MODE", load_default=None)
    audit_index_mode = EnvText(data_key="AUDIT_INDEX_MODE", load_default=None)
    redis_url = EnvText(data_key="REDIS_URL", load_default=None)
    redis_prefix = EnvText(data_key="REDIS_PREFIX", load_default=None)
    redis_sentinels = EnvText(data_key="REDIS_SENTINELS", load_default=None)
    redis_sentinel_master = EnvText(data_key="REDIS_SENTINEL_MASTER", load_default=None)
    redis_cluster = EnvBool(data_key="REDIS_CLUSTER", load_default=None)
    redis_wait_replicas = EnvInt(0, 16, data_key="REDIS_WAIT_REPLICAS", load_default=0)
    redis_wait_timeout_ms = EnvInt(1, 60000, data_key="REDIS_WAIT_TIMEOUT_MS", load_default=100)
    redis_multiplex = EnvBool(data_key="REDIS_MULTIPLEX", load_default=True)
    store_app = EnvSegment(data_key="STORE_APP", load_default=None)
    store_env = EnvSegment(data_key="STORE_ENV", load_default="dev")
    store_max_value_bytes = EnvInt(1024, data_key="STORE_MAX_VALUE_BYTES", load_default=1024 * 1024)
    redis_socket_timeout_ms = EnvInt(1, 60000, data_key="REDIS_SOCKET_TIMEOUT_MS", load_default=250)
    redis_connect_timeout_ms = EnvInt(1, 60000, data_key="REDIS_CONNECT_TIMEOUT_MS", load_default=250)
    redis_op_deadline_ms = EnvInt(1, 60000, data_key="REDIS_OP_DEADLINE_MS", load_default=1000)
    redis_max_retries = EnvInt(0, 2, data_key="REDIS_MAX_RETRIES", load_default=2)
    redis_breaker_fail_max = EnvInt(1, data_key="REDIS_BREAKER_FAIL_MAX", load_default=5)
    redis_breaker_reset_timeout_ms = EnvInt(1, data_key="REDIS_BREAKER_RESET_TIMEOUT_MS", load_default=5000)
    redis_init_timeout_ms = EnvInt(1, data_key="REDIS_INIT_TIMEOUT_MS", load_default=8000)
    redis_close_timeout_ms = EnvInt(1, data_key="REDIS_CLOSE_TIMEOUT_MS", load_default=1500)
    redis_machine_ttl_ms = EnvInt(1, data_key="REDIS_MACHINE_TTL_MS", load_default=None)
    redis_inflight_ttl_ms = EnvInt(1, data_key="REDIS_INFLIGHT_TTL_MS", load_default=None)
    store_flags_file = EnvText(data_key="STORE_FLAGS_FILE", load_default=None)
    relay_workers = EnvInt(1, 64, data_key="RELAY_WORKERS", load_default=1)
    relay_worker_class = EnvChoice(("gevent", "gthread"), data_key="RELAY_WORKER_CLASS", load_default="gevent")
    relay_connections = EnvInt(4, 16384, data_key="RELAY_CONNECTIONS", load_default=None)
    relay_threads = EnvInt(4, 16384, data_key="RELAY_THREADS", load_default=None)
    log_level = EnvChoice(("DEBUG", "INFO", "WARNING", "ERROR"), data_key="LOG_LEVEL", load_default="INFO")


@dataclass(frozen=True)
class Settings:
    """The relay's configuration. Build with ``load_settings(os.environ)``."""

    relay_host: str = "0.0.0.0"
    relay_port: int = 8787
    allowlist: frozenset[str] = frozenset()
    machine_bindings: Mapping[str, str] = field(default_factory=dict)
    wecom_token: Optional[str] = None
    wecom_encoding_aes_key: Optional[str] = None
    wecom_corp_id: Optional[str] = None
    wecom_agent_secret: Optional[str] = None
    wecom_agent_id: Optional[int] = None
    wecom_callback_path: str = DEFAULT_CALLBACK_PATH
    callback_routes: tuple[str, ...] = (DEFAULT_CALLBACK_PATH,)
    wecom_passive_reply: bool = True
    wecom_api_base_url: str = "https://qyapi.weixin.qq.com"
    admin_token: Optional[str] = None
    #: ``AGENT_AUTH_TOKEN``: one token any agent may present (relay/agents/auth.py).
    agent_auth_token: Optional[str] = None
    #: ``AGENT_TOKENS``: ``machine:token`` pairs; a listed machine must present its own token.
    agent_tokens: Mapping[str, str] = field(default_factory=dict)
    #: ``CALLBACK_SHARED_SECRET``: required (``x-callback-secret``) on callbacks WeCom did not sign.
    callback_secret: Optional[str] = None
    #: ``WECOM_TIMESTAMP_TOLERANCE_S``: how far a signed request's timestamp may be from now; 0 = unchecked.
    wecom_timestamp_tolerance_s: int = 300
    result_webhook_url: Optional[str] = None
    audit_log_path: str = "audit/relay-command-events.jsonl"
    audit_max_records: int = 2000
    audit_max_events_per_command: int = 200
    machine_heartbeat_timeout_ms: int = 45000
    inflight_command_timeout_ms: int = 900000
    command_template_ttl_ms: int = 86400000
    command_template_max: int = 5000
    command_fingerprint_ttl_ms: int = 15000
    rate_limit_per_minute: int = 60
    idempotency_ttl_ms: int = 86400000
    locale_ttl_ms: int = 30 * 86400000
    sweep_interval_ms: int = 60000
    agent_ping_interval_ms: int = 20000
    agent_idle_timeout_ms: int = 60000
    agent_max_message_bytes: int = 16 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    store_backend: str = "memory"
    audit_backend: str = "memory"
    redis_url: Optional[str] = None
    store_app: str = "codexbridge"
    store_env: str = "dev"
    store_max_value_bytes: int = 1024 * 1024
    redis_socket_timeout_ms: int = 250
    redis_connect_timeout_ms: int = 250
    redis_op_deadline_ms: int = 1000
    redis_max_retries: int = 2
    redis_breaker_fail_max: int = 5
    redis_breaker_reset_timeout_ms: int = 5000
    redis_init_timeout_ms: int = 8000
    redis_close_timeout_ms: int = 1500
    #: ``REDIS_WAIT_REPLICAS``: replicas that must acknowledge correctness-critical writes (0 = off).
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 100
    #: ``REDIS_MULTIPLEX``: under gevent, greenlets' round trips share one connection
    #: (``relay.stores.redis_multiplex``); off, each takes a pooled connection of its own.
    redis_multiplex: bool = True
    machine_ttl_ms: int = 90000
    inflight_ttl_ms: int = 1800000
    relay_workers: int = 1
    #: ``RELAY_WORKER_CLASS``: gunicorn's worker class (config/gunicorn.py).
    relay_worker_class: str = "gevent"
    #: ``RELAY_CONNECTIONS`` (formerly ``RELAY_THREADS``): simultaneous connections per worker.
    relay_connections: int = 1024
    log_level: str = "INFO"
    #: Per-domain migration plans (config/phases.py), from STORE_PHASE and the STORE_* flags.
    plans: Mapping[str, DomainPlan] = field(default_factory=lambda: resolve_plans({}))
    #: The environment the plans were resolved from, so runtime flag changes layer on top of it.
    flag_env: Mapping[str, str] = field(default_factory=dict)
    #: Backends the legacy per-domain variables chose explicitly (``AUDIT_INDEX_MODE``).
    domain_backends: Mapping[str, str] = field(default_factory=dict)
    #: ``STORE_FLAGS_FILE``: a JSON file of flag overrides, re-read when it changes.
    flags_file: Optional[str] = None

    @property
    def admin_open(self) -> bool:
        return self.admin_token is None

    def resolve_flags(self, overrides: Optional[Mapping[str, str]] = None) -> dict[str, DomainPlan]:
        """The plans of the startup flag environment with ``overrides`` on top; raise ``FlagError``."""
        return resolve_store_plans({**self.flag_env, **(overrides or {})}, self.store_backend,
                                   self.domain_backends, self.redis_url)

    @property
    def max_agent_connections(self) -> int:
        """Each agent socket holds one of the worker's connections: keep some free for HTTP requests."""
        return max(1, self.relay_connections - max(4, self.relay_connections // 16))


def resolve_store_plans(flag_env: Mapping[str, str], store_backend: str, domain_backends: Mapping[str, str],
                        redis_url: Optional[str]) -> dict[str, DomainPlan]:
    """``resolve_plans`` with the legacy defaults ``load_settings`` derived; raise ``FlagError``."""
    return resolve_plans(flag_env, default_backend=store_backend, domain_backends=dict(domain_backends) or None,
                         redis_configured=bool(redis_url))


def parse_allowlist(raw: str) -> frozenset[str]:
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def parse_machine_bindings(raw: str) -> dict[str, str]:
    """``user:machine`` pairs separated by commas; later pairs win.

    Unlike the reference (which keeps only the text up to a second ``:``), the
    machine id is everything after the first ``:``, so machine ids may contain ``:``.
    """
    bindings: dict[str, str] = {}
    for pair in raw.split(","):
        user, sep, machine = pair.partition(":")
        user, machine = user.strip(), machine.strip()
        if sep and user and machine:
            bindings[user] = machine
    return bindings


def parse_agent_tokens(raw: str) -> dict[str, str]:
    """``machine:token`` pairs separated by commas; the token is what follows the last ``:``."""
    tokens: dict[str, str] = {}
    for pair in raw.split(","):
        machine, sep, token = pair.strip().rpartition(":")
        machine, token = machine.strip(), token.strip()
        if sep and machine and token:
            tokens[machine] = token
    return tokens


def _passive_reply(raw: str) -> bool:
    return raw.strip().lower() not in {"0", "false", "no", "off"}


def _store_backend(values: dict[str, Any]) -> tuple[str, str]:
    """STORE_BACKEND wins; else the reference's STORE_MODE; else redis when REDIS_URL is set."""
    errors: dict[str, str] = {}
    backend = values.get("store_backend")
    mode = values.get("store_mode")
    if mode is not None and mode.strip() not in ("memory", "redis"):
        errors["STORE_MODE"] = "accepts one of: memory, redis"
    if backend is None:
        backend = mode.strip() if mode and mode.strip() in ("memory", "redis") else None
    if backend is None:
        backend = "redis" if normalize_secret(values.get("redis_url")) else "memory"
    audit = values.get("audit_index_mode")
    if audit is not None and audit.strip() not in ("memory", "redis"):
        errors["AUDIT_INDEX_MODE"] = "accepts one of: memory, redis"
        audit = None
    if errors:
        raise ConfigError(_format_errors(errors))
    return backend, (audit.strip() if audit else backend)


def _format_errors(errors: Mapping[str, Any]) -> str:
    lines = []
    for name in sorted(errors):
        detail = errors[name]
        if isinstance(detail, list):
            detail = "; ".join(str(d) for d in detail)
        lines.append(f"{name}: {detail}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


#: Variables whose empty value means something; every other empty variable means "unset".
KEEP_EMPTY = frozenset({"AUDIT_LOG_PATH", "REDIS_PREFIX"})


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Validate the environment; raise ``ConfigError`` naming every bad variable."""
    raw = {
        k: v for k, v in environ.items()
        if isinstance(v, str) and (v.strip() or k in KEEP_EMPTY)
    }
    try:
        values = EnvSchema().load(raw)
    except marshmallow.ValidationError as exc:
        raise ConfigError(_format_errors(exc.messages)) from None

    try:
        redis_url = resolve_redis_url(normalize_secret(values["redis_url"]), normalize_secret(values["redis_sentinels"]),
                                      normalize_secret(values["redis_sentinel_master"]), values["redis_cluster"])
    except RedisTargetError as exc:
        raise ConfigError(_format_errors({exc.variable: str(exc)})) from None
    values["redis_url"] = redis_url
    backend, audit_backend = _store_backend(values)
    if values["redis_wait_replicas"] and values["redis_wait_timeout_ms"] >= values["redis_socket_timeout_ms"]:
        raise ConfigError(_format_errors({"REDIS_WAIT_TIMEOUT_MS": (
            f"must be less than REDIS_SOCKET_TIMEOUT_MS ({values['redis_socket_timeout_ms']}): "
            "the server holds the reply that long")}))

    agent_id_raw = normalize_secret(values["wecom_agent_id"])
    if agent_id_raw is not None and not re.fullmatch(r"\d+", agent_id_raw):
        raise ConfigError(_format_errors({"WECOM_AGENT_ID": "accepts a whole number"}))

    store_app = values["store_app"]
    if store_app is None:
        prefix = values["redis_prefix"]
        store_app = "codexbridge"
        if prefix is not None and prefix.strip().rstrip(":"):
            try:
                store_app = EnvSegment().deserialize(prefix)
            except marshmallow.ValidationError as exc:
                raise ConfigError(_format_errors({"REDIS_PREFIX": exc.messages})) from None

    if values["agent_idle_timeout_ms"] <= values["agent_ping_interval_ms"]:
        raise ConfigError(_format_errors({
            "AGENT_IDLE_TIMEOUT_MS": f"must be greater than AGENT_PING_INTERVAL_MS ({values['agent_ping_interval_ms']})"}))
    flag_env = {k: v for k, v in raw.items() if k.startswith("STORE_")}
    explicit_audit = {"audit": audit_backend} if values.get("audit_index_mode") else {}
    try:
        plans = resolve_store_plans(flag_env, backend, explicit_audit, redis_url)
    except FlagError as exc:
        raise ConfigError(_format_errors(exc.errors)) from None
    memory_domains = sorted(d for d, p in plans.items() if p.backend == "memory")
    if values["relay_workers"] > 1 and memory_domains:
        raise ConfigError(_format_errors({"RELAY_WORKERS": (
            f"must be 1 while a domain keeps its state in process memory ({', '.join(memory_domains)}): "
            "each worker would hold its own copy. Use STORE_PHASE=redis-primary (or STORE_BACKEND=redis) "
            "with REDIS_URL for several workers")}))
    heartbeat = values["machine_heartbeat_timeout_ms"]
    inflight_timeout = values["inflight_command_timeout_ms"]
    callback_path = normalize_callback_path(values["wecom_callback_path"])
    derived: dict[str, Any] = {
        "relay_host": values["relay_host"].strip() or "0.0.0.0",
        "allowlist": parse_allowlist(values["allowlist_users"]),
        "machine_bindings": parse_machine_bindings(values["machine_bindings"]),
        "wecom_token": normalize_secret(values["wecom_token"]),
        "wecom_corp_id": normalize_secret(values["wecom_corp_id"]),
        "wecom_agent_secret": normalize_secret(values["wecom_agent_secret"]),
        "wecom_agent_id": int(agent_id_raw) if agent_id_raw else None,
        "wecom_callback_path": callback_path,
        "callback_routes": tuple(callback_route_paths(callback_path)),
        "wecom_passive_reply": _passive_reply(values["wecom_passive_reply"]),
        "wecom_api_base_url": values["wecom_api_base_url"].rstrip("/"),
        "admin_token": normalize_secret(values["admin_token"]),
        "agent_auth_token": normalize_secret(values["agent_auth_token"]),
        "agent_tokens": parse_agent_tokens(values["agent_tokens"]),
        "callback_secret": normalize_secret(values["callback_secret"]),
        "result_webhook_url": normalize_secret(values["result_webhook_url"]),
        "machine_heartbeat_timeout_ms": heartbeat,
        "inflight_command_timeout_ms": inflight_timeout,
        "store_backend": backend,
        "audit_backend": audit_backend,
        "redis_url": redis_url,
        "store_app": store_app,
        "machine_ttl_ms": values["redis_machine_ttl_ms"] or heartbeat * 2,
        "inflight_ttl_ms": values["redis_inflight_ttl_ms"] or max(inflight_timeout * 2, 1800000),
        "plans": plans,
        "flag_env": flag_env,
        "domain_backends": explicit_audit,
        "flags_file": (values["store_flags_file"] or "").strip() or None,
        "relay_connections": values["relay_connections"] or values["relay_threads"] or DEFAULT_CONNECTIONS,
    }
    # Every other setting is its variable's parsed value, under the same name.
    same = {f.name: values[f.name] for f in dataclasses.fields(Settings) if f.name in values}
    return Settings(**{**same, **derived})
