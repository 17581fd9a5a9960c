"""Request-scoped store routing.

At the start of a request (or a WebSocket frame, or a sweep) the router takes
one snapshot of the per-domain migration plans and binds, per domain, the
routed store the domain modules use until the unit of work ends. Domain modules
ask for their store through a provider (``router.provider("audit")``) and never
see a flag or a backend class. Plans change at runtime with ``apply_plans``;
units of work already running keep the snapshot they started with.
"""
from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from config.phases import DomainPlan
from middleware import unit_of_work
from middleware.observer import NullObserver, StoreObserver
from middleware.routed_store import RoutedStore
from middleware.shadow import ShadowComparer
from middleware.writeback import Reconciler, WriteBackJournal
from relay.stores.base import Store
from relay.stores.domain import Domain, DomainStore, MissListener
from relay.stores.keys import KeySpace

log = logging.getLogger("relay.store")

StoreProvider = Callable[[], DomainStore]


@dataclass(frozen=True)
class Binding:
    """The stores one unit of work uses, fixed for its whole duration."""

    stores: Mapping[str, DomainStore]
    plans: Mapping[str, DomainPlan]
    version: int

    def store(self, domain: str) -> DomainStore:
        return self.stores[domain]


_current: contextvars.ContextVar[Optional[Binding]] = contextvars.ContextVar("store_binding", default=None)


class BoundScope:
    """The context manager ``StoreRouter.bound`` returns; entering it gives the bound ``Binding``.

    A class rather than a generator: each callback enters two (its request and its agent's result
    frame), and a generator-based context manager costs several times as much."""

    __slots__ = ("_router", "_fresh", "_token", "_unit")

    _unit: contextvars.Token[Optional[unit_of_work.UnitOfWork]]

    def __init__(self, router: StoreRouter, fresh: bool) -> None:
        self._router = router
        self._fresh = fresh
        self._token: Optional[contextvars.Token[Optional[Binding]]] = None

    def __enter__(self) -> Binding:
        existing = _current.get()
        if existing is not None and not self._fresh:
            return existing
        binding = self._router.snapshot()
        self._token = _current.set(binding)
        self._unit = unit_of_work.begin()
        return binding

    def __exit__(self, *exc: object) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        try:
            unit_of_work.end(self._unit)
        finally:
            _current.reset(token)


class StoreRouter:
    """Chooses, per domain, how the backends serve it, and binds that choice per unit of work."""

    def __init__(
        self,
        keys: KeySpace,
        domains: Mapping[str, Domain],
        backends: Mapping[str, Store],
        plans: Mapping[str, DomainPlan],
        observer: Optional[StoreObserver] = None,
        on_miss: Optional[MissListener] = None,
        shadow: Optional[ShadowComparer] = None,
    ) -> None:
        self._keys = keys
        self._domains = dict(domains)
        self._backends = dict(backends)
        self._observer = observer or NullObserver()
        self._on_miss = on_miss
        self.shadow = shadow or ShadowComparer(self._observer)
        self.journal = WriteBackJournal()
        self.reconciler = Reconciler(self._backends, self.journal, self._observer, self.prefix_of,
                                     on_copy_done=self._copy_done)
        self._lock = threading.RLock()
        self._copying: dict[str, str] = {}
        self._binding = self._build(plans, 0)

    # -- building ---------------------------------------------------------------------------------
    def prefix_of(self, domain: str) -> str:
        spec = self._domains[domain]
        return self._keys.prefix(spec.name, spec.colocated)

    def _build(self, plans: Mapping[str, DomainPlan], version: int) -> Binding:
        missing = set(self._domains) - set(plans)
        if missing:
            raise ValueError(f"no plan for domains {sorted(missing)}")
        stores = {}
        for name, domain in self._domains.items():
            plan = plans[name]
            needed = {plan.backend, plan.read_preference} | ({plan.secondary} if plan.secondary else set())
            absent = needed - set(self._backends)
            if absent:
                raise ValueError(f"domain {name} needs backend(s) {sorted(absent)} which are not configured")
            routed = RoutedStore(name, plan, self._backends, self._observer, self.shadow, self.journal,
                                 pull_from=self._pull_source(name, plan))
            stores[name] = DomainStore(routed, self._keys, domain, on_miss=self._on_miss)
        return Binding(stores=stores, plans=dict(plans), version=version)

    def _pull_source(self, domain: str, plan: DomainPlan) -> Optional[Store]:
        direction = self._copying.get(domain)
        target, source = {"backfill": ("redis", "memory"), "warmup": ("memory", "redis")}.get(direction, (None, None))
        return self._backends[source] if target is not None and plan.backend == target else None

    def start(self) -> None:
        self.shadow.start()
        self.reconciler.start()

    # -- runtime changes --------------------------------------------------------------------------
    def apply_plans(self, plans: Mapping[str, DomainPlan]) -> dict[str, tuple[DomainPlan, DomainPlan]]:
        """Switch to new plans; return ``{domain: (old, new)}`` for the domains that changed.

        A domain whose writes start reaching a backend, or whose authority moves, gets that
        backend filled from the other in the background (backfill into Redis, warm-up into
        memory), never overwriting newer values and never deleting anything. Until the copy
        is done, the keys an operation touches are pulled over first when the backend being
        filled is the authoritative one.
        """
        with self._lock:
            old = self._binding
            for domain in self._domains:
                direction = self._copy_direction(old.plans[domain], plans[domain])
                if direction is not None:
                    self._copying[domain] = direction
            new = self._build(plans, old.version + 1)
            self._binding = new
        changed = {d: (old.plans[d], new.plans[d]) for d in self._domains if old.plans[d] != new.plans[d]}
        for domain, (before, after) in changed.items():
            direction = self._copy_direction(before, after)
            if direction is not None:
                self.reconciler.schedule_copy(domain, direction)
        return changed

    def _copy_direction(self, before: DomainPlan, after: DomainPlan) -> Optional[str]:
        if "redis" not in self._backends or before == after:
            return None
        if (before.backend, after.backend) == ("redis", "memory"):
            return "warmup"
        if (before.backend, after.backend) == ("memory", "redis"):
            return "backfill"
        if _writes(after, "redis") and not _writes(before, "redis"):
            return "backfill"
        if _writes(after, "memory") and not _writes(before, "memory"):
            return "warmup"
        return None

    def redis_data_lost(self) -> list[str]:
        """Redis lost its data: refill it from memory for every domain that keeps a full copy there
        (dual-written, so memory holds every write). Until each backfill is done, the keys an
        operation touches are pulled over first where Redis is authoritative, so a reservation or a
        record made before the loss is still seen. Return the domains being refilled; the others
        (``redis-primary``) have no second copy in this process."""
        with self._lock:
            domains = [d for d, plan in self._binding.plans.items() if plan.dual_write]
            for domain in domains:
                self._copying[domain] = "backfill"
            self._binding = self._build(self._binding.plans, self._binding.version + 1)
        for domain in domains:
            self.reconciler.schedule_copy(domain, "backfill")
        return domains

    def _copy_done(self, domain: str) -> None:
        """A backfill or warm-up finished: stop pulling keys for that domain."""
        with self._lock:
            if self._copying.pop(domain, None) is None:
                return
            self._binding = self._build(self._binding.plans, self._binding.version + 1)

    @property
    def plans(self) -> Mapping[str, DomainPlan]:
        return self._binding.plans

    @property
    def backends(self) -> Mapping[str, Store]:
        return self._backends

    # -- binding ----------------------------------------------------------------------------------
    def snapshot(self) -> Binding:
        """The configuration in force now."""
        return self._binding

    def bound(self, fresh: bool = False) -> BoundScope:
        """Bind one snapshot for the duration of a request, frame or sweep (``with``).

        Nested scopes keep the outer snapshot, so a unit of work never mixes two; ``fresh``
        starts a new unit of work inside a long-lived one (each frame of an agent socket,
        whose upgrade request lasts as long as the connection). Each scope has its
        ``middleware.unit_of_work.UnitOfWork``, flushed when the scope ends.
        """
        return BoundScope(self, fresh)

    def store(self, domain: str) -> DomainStore:
        """The bound store for ``domain``; outside any scope, the current snapshot's."""
        binding = _current.get() or self.snapshot()
        return binding.store(domain)

    def provider(self, domain: str) -> StoreProvider:
        """``store(domain)`` as a function of nothing, for the domain modules (asked some 16 times
        per callback, so it looks the binding up itself)."""
        if domain not in self._domains:
            raise KeyError(domain)
        return lambda: (_current.get() or self._binding).stores[domain]

    def describe(self) -> dict[str, Any]:
        """Per-domain plan, copy progress, shadow counts and pending write-backs, for ``/ops/store``."""
        pending = self.journal.pending()
        out = {}
        for domain, plan in self.plans.items():
            progress = self.reconciler.progress.get(domain)
            out[domain] = {
                "flags": plan.as_flags(),
                "copy": None if progress is None else progress.as_dict(),
                "shadow": dict(self.shadow.counts.get(domain, {})),
                "pendingWriteBack": pending.get(domain, 0),
                "writeBackOverflow": self.journal.overflow.get(domain, 0),
            }
        return out

    def close(self) -> None:
        self.reconciler.stop()
        self.shadow.stop()
        for backend in self._backends.values():
            backend.close()


def _writes(plan: DomainPlan, backend: str) -> bool:
    return backend in (plan.backend, plan.secondary)
