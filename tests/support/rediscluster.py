"""A throwaway Redis Cluster on loopback: N primaries (and optional replicas) on free ports.

    with LocalRedisCluster(masters=3) as cluster:
        RedisStore(..., cluster.url)            # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...

Each node is ``redis-server --cluster-enabled yes`` in its own directory, keeping nothing on disk,
with its cluster bus on a second free port (``--cluster-port``, so ``port + 10000`` is never assumed
free). ``redis-cli --cluster create --cluster-yes`` assigns the slots; ``start`` returns once every
node reports ``cluster_state:ok`` and agrees that all 16384 slots are served. ``close`` always stops
every process and removes the directory. It imports nothing from ``relay``.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.support.redisproc import HOST, RedisServerError, free_ports, stop_processes

SLOTS = 16384


class LocalRedisCluster:
    """Controls the node processes of one local cluster."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 0, node_timeout_ms: int = 2000,
                 startup_timeout_s: float = 20.0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        for binary in ("redis-server", "redis-cli"):
            if shutil.which(binary) is None:
                raise RedisServerError(f"{binary!r} is not on PATH; install it (`make redis-server`)")
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout_s = startup_timeout_s
        self.ports: list[int] = []
        self._workdir = Path(tempfile.mkdtemp(prefix="relay-redis-cluster-"))
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- addressing ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming every node as a startup node."""
        if not self.ports:
            raise RedisServerError("the cluster has not been started")
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def client(self, **kwargs: Any) -> RedisCluster:
        """A redis-py cluster client (``decode_responses=True``) for inspecting the cluster."""
        options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5}
        options.update(kwargs)
        return RedisCluster(startup_nodes=[ClusterNode(HOST, port) for port in self.ports], **options)

    def node_client(self, port: int) -> redis.Redis:
        """A plain client on one node."""
        return redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=5)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LocalRedisCluster":
        """Start the nodes, create the cluster and wait until it serves every slot."""
        total = self.masters * (1 + self.replicas_per_master)
        try:
            ports = free_ports(2 * total)
            for port, bus_port in zip(ports[::2], ports[1::2]):
                self._spawn(port, bus_port)
            for port in self.ports:
                self._wait_ping(port)
            self._create()
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def flush(self) -> None:
        """``FLUSHALL`` on every primary."""
        for port in self.primary_ports():
            with self.node_client(port) as node:
                node.flushall()

    def primary_ports(self) -> list[int]:
        """The ports of the nodes that are primaries now."""
        return [port for port in self.ports if self._role(port) == "master"]

    def close(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove the working directory."""
        stop_processes(self._procs.values())
        self._procs.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _spawn(self, port: int, bus_port: int) -> None:
        node_dir = self._workdir / str(port)
        node_dir.mkdir()
        args = [
            "redis-server",
            "--bind", HOST, "--port", str(port),
            "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
            "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "", "--appendonly", "no",
            "--dir", str(node_dir), "--daemonize", "no", "--protected-mode", "yes",
            "--loglevel", "warning", "--logfile", str(node_dir / "redis.log"),
        ]
        self._procs[port] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
        self.ports.append(port)

    def _wait_ping(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        with self.node_client(port) as node:
            while True:
                if self._procs[port].poll() is not None:
                    raise RedisServerError(f"cluster node {port} exited; see {self._workdir / str(port)}")
                try:
                    if node.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(f"cluster node {port} did not answer PING")
                time.sleep(0.02)

    def _create(self) -> None:
        args = ["redis-cli", "--cluster", "create", *(f"{HOST}:{port}" for port in self.ports),
                "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        done = subprocess.run(args, capture_output=True, timeout=self.startup_timeout_s)
        if done.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r} "
                                   f"{done.stderr[-2000:]!r}")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last: Optional[dict[str, Any]] = None
        while time.monotonic() < deadline:
            infos = [self._cluster_info(port) for port in self.ports]
            if all(info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == SLOTS
                   and int(info.get("cluster_known_nodes", 0)) == len(self.ports) for info in infos):
                return
            last = infos[0]
            time.sleep(0.05)
        raise RedisServerError(f"the cluster did not reach cluster_state:ok: {last}")

    def _cluster_info(self, port: int) -> dict[str, Any]:
        with self.node_client(port) as node:
            try:
                return dict(node.cluster("INFO"))
            except redis.RedisError:
                return {}

    def _role(self, port: int) -> str:
        with self.node_client(port) as node:
            return str(node.execute_command("ROLE")[0])
