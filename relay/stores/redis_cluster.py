"""``RedisClusterStore``: ``RedisStore`` on a Redis Cluster (``redis+cluster://``; docs/redis-ha.md).

What differs from one server:

* **Batches are split by hash slot.** A node refuses a multi-key command or script whose keys are in
  different slots (``CROSSSLOT``), so ``mget`` and ``mset`` without a TTL use redis-py's
  ``mget_nonatomic``/``mset_nonatomic``, ``mset`` with a TTL runs its script once per slot, and
  ``delete`` is split by redis-py's cluster client. Each is atomic within a slot only; the keys of a
  colocated domain (``{domain}`` hash tag) share one slot, so batches within such a domain stay atomic.
* **``execute`` pipelines per node.** Consecutive operations whose keys all lie in one slot and on one
  node go out in one pipeline on that node (a cluster pipeline cannot carry scripts); an operation
  spanning slots runs alone, through the methods above. ``guarded_reserve`` (a rate-limit counter and a
  reservation in two slots) and ``compare_and_set_then_claim`` (an audit record, then an in-flight
  record and its index) take their steps one by one (``cross_slot_scripts`` is off).
* **Listings scan every primary**: redis-py's cluster ``scan_iter`` walks each primary's cursor.
* **Topology changes are outages, briefly.** ``CLUSTERDOWN``, ``TRYAGAIN``, a slot not covered, or
  redirections a node pipeline cannot follow are handled like connection errors (``StoreUnavailable``,
  retried when idempotent) after the slot map is refreshed.
* **The data-loss marker is checked by ``check_data_loss`` only**: a cluster connection may go to any
  node, and the marker key lives on one of them.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, TypeVar, Union

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, SlotNotCoveredError, TryAgainError

from relay.stores.base import Op, Store, StoreUnavailable
from relay.stores.redis import ClientFactory, RedisStore
from relay.stores.redis_connect import node_client_for
from relay.stores.redis_pipeline import ConnectionPipeline, Connections

T = TypeVar("T")
#: Answers meaning the slot map moved or the cluster is (re)electing: refresh, then an outage.
_TOPOLOGY = (ClusterError, TryAgainError, redis.exceptions.AskError, SlotNotCoveredError)


class RedisClusterStore(RedisStore):
    """The ``Store`` interface on a Redis Cluster (see the module docstring)."""

    cluster_aware = True

    def __init__(self, target: Union[str, ClientFactory], **kwargs: Any) -> None:
        kwargs["cross_slot_scripts"] = False
        super().__init__(target, **kwargs)

    # -- running one operation -----------------------------------------------------------------
    def _run(self, op: Callable[[Any], T], idempotent: bool) -> T:
        def guarded(b: Any) -> T:
            try:
                return op(b)
            except _TOPOLOGY as exc:
                _refresh(b.client)
                raise redis.ConnectionError(f"redis cluster topology changing: {type(exc).__name__}") from exc
            except RedisClusterException as exc:
                raise redis.RedisError(f"redis cluster: {exc}") from exc

        return super()._run(guarded, idempotent)

    def _current(self) -> Any:
        try:
            return super()._current()
        except redis.ConnectionError as exc:
            raise StoreUnavailable(f"redis cluster unavailable: {exc}") from exc

    def _on_connect(self, connection: Any) -> None:
        """Nothing beyond redis-py's cluster handshake (it ran already): see the module docstring."""

    def _pipeline(self, b: Any, ops: Sequence[Op], shared: bool = True) -> ConnectionPipeline:
        """A pipeline on the node serving the (single) slot of ``ops``."""
        node = node_client_for(b.client, ops[0].keys()[0])
        return ConnectionPipeline(Connections(node.connection_pool, keep=False))

    def parser_name(self) -> str:
        client = self._client()
        node = client.get_random_node()
        pool = client.get_redis_connection(node).connection_pool
        conn = pool.get_connection()
        try:
            return type(conn._parser).__name__
        finally:
            pool.release(conn)

    # -- multi-key operations, split by slot ---------------------------------------------------------
    def _mget(self, b: Any, keys: list[str]) -> list[Optional[str]]:
        return b.client.mget_nonatomic(keys)

    def _mset(self, b: Any, items: dict[str, str], ttl_ms: Optional[int]) -> None:
        if ttl_ms is None:
            b.client.mset_nonatomic(items)
            return
        slots: dict[int, list[str]] = defaultdict(list)
        for key in items:
            slots[b.client.keyslot(key)].append(key)
        for keys in slots.values():
            self._set_with_ttl(b, keys, items, ttl_ms)

    def index_add_each(self, adds: Mapping[str, Mapping[str, float]]) -> None:
        """One script where every index is in one slot, else one ``index_add`` each."""
        if self._slot_of(Op("index_add_each", (dict(adds),))) is None:
            return Store.index_add_each(self, adds)
        return super().index_add_each(adds)

    def index_add_capped(self, key: str, members: Mapping[str, float], max_size: int,
                         record_prefix: str, watermark: Optional[str] = None) -> list[str]:
        if self._slot_of(Op("index_add_capped", (key, members, max_size, record_prefix, watermark))) is None:
            return Store.index_add_capped(self, key, members, max_size, record_prefix, watermark)
        return super().index_add_capped(key, members, max_size, record_prefix, watermark)

    def execute(self, ops: Sequence[Op]) -> list[Any]:
        """``ops`` in order: runs of operations on one node share a pipeline (see the module docstring)."""
        for op in ops:
            self._queued(op)  # every argument is checked before anything is sent
        results: list[Any] = []
        start = 0
        while start < len(ops):
            node = self._node_of(ops[start])
            if node is None:
                results.append(ops[start].run(self))
                start += 1
                continue
            end = start + 1
            while end < len(ops) and self._node_of(ops[end]) == node:
                end += 1
            results.extend(super().execute(ops[start:end]))
            start = end
        return results

    def _slot_of(self, op: Op) -> Optional[int]:
        """The one slot of every key ``op`` touches, or ``None`` (no keys, several slots, or the
        records an ``index_add_capped`` may delete or its watermark lie outside the index's slot)."""
        client: RedisCluster = self._client()
        keys = op.keys()
        if op.name == "index_add_capped":
            keys = (*keys, *(arg for arg in op.args[3:5] if arg is not None))
        slots = {client.keyslot(key) for key in keys}
        return slots.pop() if len(slots) == 1 else None

    def _node_of(self, op: Op) -> Optional[str]:
        slot = self._slot_of(op)
        if slot is None:
            return None
        try:
            return str(self._client().nodes_manager.get_node_from_slot(slot).name)
        except SlotNotCoveredError:
            return None


def _refresh(client: Any) -> None:
    """Reload the slot map after a redirection or a failover; a failure here changes nothing."""
    if isinstance(client, RedisCluster):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException):
            pass
