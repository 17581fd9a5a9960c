"""``WAIT`` after the writes that must survive a failover (``REDIS_WAIT_REPLICAS``; docs/redis-ha.md).

Redis replicates asynchronously: a primary acknowledges a write before any replica has it, and a
failover can promote a replica that never received it. ``WAIT n timeout`` blocks until ``n``
replicas acknowledged every earlier write *of the same connection*, so the write and its ``WAIT``
go out together on one connection of the node that owns the key (a non-transactional pipeline).

``ReplicaWait`` says which keys are covered (those under the prefixes of the correctness-critical
domains) and how many replicas must acknowledge. ``RedisStore.execute`` ends every pipeline that
writes a covered key with ``WAIT`` (its single-operation methods go through ``execute`` for covered
keys), and ``settle`` handles a shortfall, when fewer replicas acknowledged in time:

* a msgId reservation (``set_if_absent``, ``guarded_reserve``) and an in-flight record (``set``,
  written before the command is sent) are removed again, if still the value written, and
  ``NotReplicated`` (a ``StoreUnavailable``) is raised: the callback is answered 503 before any side
  effect, and WeCom's retry decides again on whichever primary is then in charge;
* a claimed in-flight record (``compare_and_delete``, by a result or a timeout, or the claim of
  ``compare_and_set_then_claim``, by a result audited in the same script) ends work that has
  already happened, so it keeps its result: the shortfall is counted and logged.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from relay.stores.base import Op, StoreUnavailable
from relay.stores.keys import KeySpace
from relay.stores.redis_connect import Client, node_client_for

log = logging.getLogger("relay.stores")

#: The domains whose writes are waited for when ``REDIS_WAIT_REPLICAS`` is set.
WAIT_DOMAINS = ("idempotency", "inflight")
#: The writes followed by ``WAIT`` when their key is covered.
_WAITED = frozenset({"set", "set_if_absent", "guarded_reserve", "compare_and_delete", "compare_and_set_then_claim"})
#: Covered writes that end work already done: a shortfall is counted, not undone.
_KEPT = frozenset({"compare_and_delete", "compare_and_set_then_claim"})

# KEYS[1]; ARGV[1]: the value this call wrote. Removes it only while it is still that value.
_UNDO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class NotReplicated(StoreUnavailable):
    """A covered write reached the primary, but fewer replicas than required acknowledged it in time."""


class ReplicaWait:
    """Which keys are waited for, for how many replicas and how long; counts the shortfalls."""

    def __init__(self, replicas: int, timeout_ms: int, prefixes: Iterable[str]) -> None:
        if replicas < 1 or timeout_ms < 1:
            raise ValueError("replicas and timeout_ms must be positive")
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.prefixes = tuple(prefixes)
        self._lock = threading.Lock()
        self._shortfalls = 0

    @classmethod
    def for_domains(cls, keys: KeySpace, replicas: int, timeout_ms: int,
                    domains: Iterable[str] = WAIT_DOMAINS) -> Optional["ReplicaWait"]:
        """Covering ``domains`` (colocated or not); ``None`` when ``replicas`` is 0."""
        if replicas <= 0:
            return None
        prefixes = [keys.prefix(domain, colocated) for domain in domains for colocated in (False, True)]
        return cls(replicas, timeout_ms, prefixes)

    def covers(self, key: str) -> bool:
        return key.startswith(self.prefixes)

    @property
    def shortfalls(self) -> int:
        """Covered writes that fewer replicas than required acknowledged in time."""
        with self._lock:
            return self._shortfalls

    # -- a pipeline with WAIT (RedisStore.execute) ---------------------------------------------------
    def written_key(self, op: Op) -> Optional[str]:
        """The covered key ``op`` writes, or ``None`` (reads, other writes, keys outside the domains)."""
        if op.name in _WAITED:
            if op.name == "compare_and_set_then_claim":
                key = op.args[4].key
            else:
                key = op.args[1] if op.name == "guarded_reserve" else op.args[0]
            if self.covers(key):
                return key
        return None

    def waits_for(self, ops: Sequence[Op]) -> bool:
        """Some of ``ops`` write a covered key, so their pipeline ends with ``WAIT``."""
        return any(self.written_key(op) is not None for op in ops)

    def settle(self, client: Client, ops: Sequence[Op], replies: Sequence[Any], acked: int) -> None:
        """After a pipeline that ended with ``WAIT`` (``acked`` replicas answered): when too few did,
        undo the covered values it wrote and raise ``NotReplicated``, or count the shortfall of
        compare-and-deletes that already took effect."""
        if acked >= self.replicas:
            return
        undone, kept = [], []
        for op, reply in zip(ops, replies):
            key = self.written_key(op)
            if key is None:
                continue
            if op.name in _KEPT:
                if reply == 1 or op.name == "compare_and_set_then_claim" and reply[1] == 1:
                    kept.append(op.name)
                continue
            if op.name == "set_if_absent" and not reply or op.name == "guarded_reserve" and reply[1] != 1:
                continue
            value = op.args[2] if op.name == "guarded_reserve" else op.args[1]
            node_client_for(client, key).eval(_UNDO, 1, key, value)
            undone.append(op.name)
        if not undone and not kept:
            return
        with self._lock:
            self._shortfalls += 1
        log.warning("redis writes acknowledged by %d of %d replicas within %d ms: %s", acked, self.replicas,
                    self.timeout_ms, ", ".join(undone + kept) + (" (undone)" if undone else ""),
                    extra={"event": "store_replication_shortfall", "acked": acked, "undone": len(undone)})
        if undone:
            raise NotReplicated(f"write acknowledged by {acked} of {self.replicas} replicas in time; undone")
