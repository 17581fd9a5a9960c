"""Migration phases and store flags, per domain (docs/migration.md).

The flags of the migration plan are ``STORE_BACKEND``, ``STORE_DUAL_WRITE``,
``STORE_READ_PREFERENCE``, ``STORE_FALLBACK_TO_MEMORY``, ``STORE_SHADOW_COMPARE``
and ``STORE_SHADOW_SAMPLE_RATE``; ``STORE_PHASE`` names a preset of them. Each can
be set for one domain as ``STORE_<DOMAIN>_<FLAG>``. Precedence, lowest first:
global phase preset, global flags, domain phase preset, domain flags.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional

DOMAINS = ("idempotency", "machines", "inflight", "audit", "templates", "ratelimit", "locale")
BACKENDS = ("memory", "redis")
PHASES = ("memory", "dual-write", "shadow", "redis-read", "rampdown", "redis-primary")
FLAGS = ("BACKEND", "DUAL_WRITE", "READ_PREFERENCE", "FALLBACK_TO_MEMORY", "SHADOW_COMPARE", "SHADOW_SAMPLE_RATE",
         "SHADOW_MODE")
#: ``compare``: the other backend; ``aa``: the same backend read twice (the noise floor, A/A).
SHADOW_MODES = ("compare", "aa")
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class FlagError(ValueError):
    """Invalid or incoherent flags; ``errors`` maps variable names to what they accept."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("invalid store flags:\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())))


@dataclass(frozen=True)
class DomainPlan:
    """The resolved store behaviour of one domain."""

    phase: Optional[str]
    backend: str
    dual_write: bool
    read_preference: str
    fallback_to_memory: bool
    shadow_compare: bool
    shadow_sample_rate: float
    shadow_mode: str = "compare"

    @property
    def authoritative(self) -> str:
        return self.backend

    @property
    def secondary(self) -> Optional[str]:
        """The backend that receives mirrored writes, if any."""
        if not self.dual_write:
            return None
        return "redis" if self.backend == "memory" else "memory"

    @property
    def uses_redis(self) -> bool:
        return "redis" in (self.backend, self.secondary, self.read_preference)

    def as_flags(self) -> dict[str, Any]:
        return {"phase": self.phase, "backend": self.backend, "dualWrite": self.dual_write,
                "readPreference": self.read_preference, "fallbackToMemory": self.fallback_to_memory,
                "shadowCompare": self.shadow_compare, "shadowSampleRate": self.shadow_sample_rate,
                "shadowMode": self.shadow_mode}


PRESETS: dict[str, DomainPlan] = {
    "memory": DomainPlan("memory", "memory", False, "memory", False, False, 1.0),
    "dual-write": DomainPlan("dual-write", "memory", True, "memory", False, False, 1.0),
    "shadow": DomainPlan("shadow", "memory", True, "memory", False, True, 1.0),
    "redis-read": DomainPlan("redis-read", "redis", True, "redis", True, True, 1.0),
    "rampdown": DomainPlan("rampdown", "redis", True, "redis", True, False, 1.0),
    "redis-primary": DomainPlan("redis-primary", "redis", False, "redis", False, False, 1.0),
}


def flag_names() -> list[str]:
    """Every variable this module reads."""
    names = ["STORE_PHASE"] + [f"STORE_{f}" for f in FLAGS]
    for domain in DOMAINS:
        prefix = f"STORE_{domain.upper()}_"
        names += [prefix + "PHASE"] + [prefix + f for f in FLAGS]
    return names


def _parse(name: str, flag: str, raw: str, errors: dict[str, str]) -> Any:
    text = raw.strip()
    if flag == "PHASE":
        if text not in PHASES:
            errors[name] = "accepts one of: " + ", ".join(PHASES)
        return text
    if flag == "SHADOW_MODE":
        if text not in SHADOW_MODES:
            errors[name] = "accepts one of: " + ", ".join(SHADOW_MODES)
        return text
    if flag in ("BACKEND", "READ_PREFERENCE"):
        if text not in BACKENDS:
            errors[name] = "accepts one of: memory, redis"
        return text
    if flag == "SHADOW_SAMPLE_RATE":
        try:
            rate = float(text)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            errors[name] = "accepts a number from 0 to 1"
        return rate
    lowered = text.lower()
    if lowered not in TRUE + FALSE:
        errors[name] = "accepts true/false, 1/0, yes/no, on/off"
    return lowered in TRUE


_FIELD = {"BACKEND": "backend", "DUAL_WRITE": "dual_write", "READ_PREFERENCE": "read_preference",
          "FALLBACK_TO_MEMORY": "fallback_to_memory", "SHADOW_COMPARE": "shadow_compare",
          "SHADOW_SAMPLE_RATE": "shadow_sample_rate", "SHADOW_MODE": "shadow_mode"}


def _layer(plan: DomainPlan, prefix: str, env: Mapping[str, str], errors: dict[str, str]) -> DomainPlan:
    phase_name = prefix + "PHASE"
    if env.get(phase_name, "").strip():
        phase = _parse(phase_name, "PHASE", env[phase_name], errors)
        if phase in PRESETS:
            plan = PRESETS[phase]
    changes: dict[str, Any] = {}
    for flag in FLAGS:
        name = prefix + flag
        if env.get(name, "").strip():
            changes[_FIELD[flag]] = _parse(name, flag, env[name], errors)
    if changes:
        plan = replace(plan, phase=plan.phase if not changes else _phase_of(replace(plan, **changes)), **changes)
    return plan


def _phase_of(plan: DomainPlan) -> Optional[str]:
    """The preset a plan equals (ignoring how shadow reads are sampled), or ``None`` for a custom mix."""
    for name, preset in PRESETS.items():
        if replace(preset, phase=None, shadow_sample_rate=plan.shadow_sample_rate,
                   shadow_mode=plan.shadow_mode) == replace(plan, phase=None):
            return name
    return None


def resolve_plans(env: Mapping[str, str], default_backend: str = "memory",
                  domain_backends: Optional[Mapping[str, str]] = None,
                  redis_configured: bool = False) -> dict[str, DomainPlan]:
    """Per-domain plans from the flags in ``env``; raise ``FlagError`` naming every bad variable.

    ``default_backend`` is what the legacy variables chose (``STORE_MODE``, ``REDIS_URL``), used
    when no phase or backend flag says otherwise; ``domain_backends`` the same per domain
    (``AUDIT_INDEX_MODE``).
    """
    errors: dict[str, str] = {}
    base = PRESETS["memory"] if default_backend == "memory" else PRESETS["redis-primary"]
    base = _layer(base, "STORE_", env, errors)
    plans = {}
    for domain in DOMAINS:
        plan = base
        legacy = (domain_backends or {}).get(domain)
        if legacy and legacy != plan.backend and not any(
                env.get(f"STORE_{domain.upper()}_{f}", "").strip() for f in ("PHASE", "BACKEND")):
            plan = PRESETS["memory"] if legacy == "memory" else PRESETS["redis-primary"]
        plans[domain] = _layer(plan, f"STORE_{domain.upper()}_", env, errors)
    for domain, plan in plans.items():
        _check(domain, plan, redis_configured, errors)
    if errors:
        raise FlagError(errors)
    return plans


def _check(domain: str, plan: DomainPlan, redis_configured: bool, errors: dict[str, str]) -> None:
    """Refuse combinations that cannot work."""
    upper = domain.upper()
    if plan.uses_redis and not redis_configured:
        errors.setdefault("REDIS_URL", f"is required: the {domain} domain uses Redis "
                                        f"(STORE_BACKEND/STORE_READ_PREFERENCE/STORE_DUAL_WRITE)")
    if plan.read_preference != plan.backend and not plan.dual_write:
        errors.setdefault(f"STORE_{upper}_READ_PREFERENCE",
                          f"reads from {plan.read_preference} need STORE_DUAL_WRITE=true when "
                          f"STORE_BACKEND={plan.backend} (that backend would never be written)")
    if plan.shadow_compare and not plan.dual_write and plan.shadow_mode == "compare":
        errors.setdefault(f"STORE_{upper}_SHADOW_COMPARE", "needs STORE_DUAL_WRITE=true (nothing to compare against)")
