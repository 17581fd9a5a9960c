"""Phase presets, per-domain overrides and refusal of incoherent flags."""
from __future__ import annotations

import pytest

from config.phases import DOMAINS, PRESETS, FlagError, flag_names, resolve_plans

REDIS = {"redis_configured": True}


def test_every_preset_matches_the_phase_table() -> None:
    table = {  # writes (authority, mirrored?), reads, fallback, shadow
        "memory": ("memory", False, "memory", False, False),
        "dual-write": ("memory", True, "memory", False, False),
        "shadow": ("memory", True, "memory", False, True),
        "redis-read": ("redis", True, "redis", True, True),
        "rampdown": ("redis", True, "redis", True, False),
        "redis-primary": ("redis", False, "redis", False, False),
    }
    for phase, row in table.items():
        p = PRESETS[phase]
        assert (p.backend, p.dual_write, p.read_preference, p.fallback_to_memory, p.shadow_compare) == row


def test_global_phase_with_domain_overrides() -> None:
    plans = resolve_plans({"STORE_PHASE": "shadow", "STORE_AUDIT_PHASE": "redis-read",
                           "STORE_INFLIGHT_SHADOW_SAMPLE_RATE": "0.25", "STORE_LOCALE_PHASE": "memory"}, **REDIS)
    assert plans["idempotency"].phase == "shadow"
    assert plans["audit"].phase == "redis-read"
    assert plans["inflight"].shadow_sample_rate == 0.25 and plans["inflight"].phase == "shadow"
    assert plans["locale"].phase == "memory" and set(plans) == set(DOMAINS)


def test_explicit_flags_override_the_preset_and_name_the_mix() -> None:
    plans = resolve_plans({"STORE_PHASE": "redis-read", "STORE_SHADOW_COMPARE": "off"}, **REDIS)
    assert plans["machines"].phase == "rampdown"
    plans = resolve_plans({"STORE_PHASE": "redis-primary", "STORE_FALLBACK_TO_MEMORY": "true"}, **REDIS)
    assert plans["machines"].phase is None and plans["machines"].fallback_to_memory


@pytest.mark.parametrize("env, named", [
    ({"STORE_PHASE": "shadow"}, "REDIS_URL"),
    ({"STORE_READ_PREFERENCE": "redis"}, "REDIS_URL"),
    ({"STORE_PHASE": "bogus"}, "STORE_PHASE"),
    ({"STORE_AUDIT_DUAL_WRITE": "maybe"}, "STORE_AUDIT_DUAL_WRITE"),
    ({"STORE_SHADOW_SAMPLE_RATE": "1.5"}, "STORE_SHADOW_SAMPLE_RATE"),
])
def test_bad_or_incoherent_flags_are_named(env: dict, named: str) -> None:
    with pytest.raises(FlagError) as info:
        resolve_plans(env)
    assert named in info.value.errors


def test_reads_from_a_backend_that_is_never_written_are_refused() -> None:
    with pytest.raises(FlagError) as info:
        resolve_plans({"STORE_PHASE": "memory", "STORE_INFLIGHT_READ_PREFERENCE": "redis"}, **REDIS)
    assert "STORE_INFLIGHT_READ_PREFERENCE" in info.value.errors
    with pytest.raises(FlagError) as info:
        resolve_plans({"STORE_PHASE": "redis-primary", "STORE_SHADOW_COMPARE": "true"}, **REDIS)
    assert "STORE_IDEMPOTENCY_SHADOW_COMPARE" in info.value.errors


def test_flag_names_cover_every_domain() -> None:
    names = flag_names()
    assert "STORE_PHASE" in names and "STORE_RATELIMIT_SHADOW_SAMPLE_RATE" in names
    assert len(names) == 8 * (1 + len(DOMAINS))


def test_aa_mode_compares_a_backend_with_itself() -> None:
    plans = resolve_plans({"STORE_SHADOW_COMPARE": "true", "STORE_SHADOW_MODE": "aa"})
    assert plans["audit"].shadow_mode == "aa" and plans["audit"].shadow_compare and not plans["audit"].dual_write
    with pytest.raises(FlagError) as info:
        resolve_plans({"STORE_SHADOW_MODE": "ab"})
    assert "STORE_SHADOW_MODE" in info.value.errors
