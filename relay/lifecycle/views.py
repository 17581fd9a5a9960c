"""Read models behind the admin routes (reference §2.2-2.7)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from relay.lifecycle.context import LifecycleContext
from relay.stores.envelope import iso_ms

StoreStatus = Callable[[], dict[str, Any]]
DomainSummaries = Callable[[], dict[str, Any]]


class AdminViews:
    def __init__(self, ctx: LifecycleContext, store_status: StoreStatus,
                 domain_summaries: Optional[DomainSummaries] = None) -> None:
        self.ctx = ctx
        self._store_status = store_status
        self._domain_summaries = domain_summaries

    def machines(self) -> dict[str, Any]:
        ctx = self.ctx
        now = ctx.clock()
        items = []
        for record in ctx.domains.machines.list():
            items.append({
                "machineId": record["machineId"],
                "connectedAt": iso_ms(record["connectedAt"]),
                "lastHeartbeatAt": iso_ms(record["lastHeartbeatAt"]),
                "stale": ctx.domains.machines.is_stale(record, now),
                "runningCount": record.get("runningCount", 0),
                "pendingCount": record.get("pendingCount", 0),
            })
        return {"items": items}

    def inflight(self) -> dict[str, Any]:
        now = self.ctx.clock()
        return {"items": [
            {"commandId": r["commandId"], "userId": r["userId"], "machineId": r["machineId"], "kind": r["kind"],
             "ageMs": now - r["createdAtMs"]}
            for r in self.ctx.domains.inflight.list()
        ]}

    def command(self, command_id: str) -> Optional[dict[str, Any]]:
        return self.ctx.domains.audit.get(command_id)

    def audit_recent(self, limit: int, user_id: Optional[str], machine_id: Optional[str],
                     status: Optional[str]) -> dict[str, Any]:
        return {"items": self.ctx.domains.audit.list_recent(limit, user_id or None, machine_id or None,
                                                            status or None)}

    def metrics(self) -> dict[str, Any]:
        ctx = self.ctx
        now = ctx.clock()
        machines = ctx.domains.machines.list()
        status = self._store_status()
        return {
            "machines": {"totalConnected": len(machines),
                         "stale": sum(1 for m in machines if ctx.domains.machines.is_stale(m, now))},
            "inflight": {"total": ctx.domains.inflight.count()},
            "audit": {"records": ctx.domains.audit.count(), "byStatus": ctx.domains.audit.status_counts()},
            "store": {"mode": status["mode"], "degraded": status["degraded"],
                      "redisErrorCount": status["redisErrorCount"],
                      **({"domains": self._domain_summaries()} if self._domain_summaries else {})},
        }

    def ops_config(self) -> dict[str, Any]:
        s = self.ctx.settings
        status = self._store_status()
        store: dict[str, Any] = {"configuredMode": status["configuredMode"], "mode": status["mode"],
                                 "degraded": status["degraded"], "redisErrorCount": status["redisErrorCount"]}
        if status.get("lastRedisError"):
            store["lastRedisError"] = status["lastRedisError"]
        store.update({"redisMachineTtlMs": s.machine_ttl_ms, "redisInflightTtlMs": s.inflight_ttl_ms})
        return {
            "relay": {
                "heartbeatTimeoutMs": s.machine_heartbeat_timeout_ms,
                "inflightTimeoutMs": s.inflight_command_timeout_ms,
                "commandTemplateTtlMs": s.command_template_ttl_ms,
                "commandTemplateMax": s.command_template_max,
                "commandFingerprintTtlMs": s.command_fingerprint_ttl_ms,
                "adminTokenEnabled": s.admin_token is not None,
                "allowlistSize": len(s.allowlist),
                "machineBindingsSize": len(s.machine_bindings),
            },
            "wecom": {
                "tokenConfigured": s.wecom_token is not None,
                "aesKeyConfigured": s.wecom_encoding_aes_key is not None,
                "corpIdConfigured": s.wecom_corp_id is not None,
                "agentSecretConfigured": s.wecom_agent_secret is not None,
                "agentIdConfigured": s.wecom_agent_id is not None,
                "callbackPath": s.wecom_callback_path,
                "callbackRoutes": list(s.callback_routes),
            },
            "audit": {"logPath": s.audit_log_path, "maxRecords": s.audit_max_records},
            "store": store,
        }
