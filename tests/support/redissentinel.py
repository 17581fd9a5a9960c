"""A throwaway Sentinel setup on loopback: one primary, two replicas and three sentinels.

    with LocalSentinel() as ha:
        ha.url                     # redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/mymaster/0
        ha.failover()              # SENTINEL FAILOVER mymaster; returns once the replica is primary

The data nodes are ``redis-server`` processes keeping nothing on disk; the sentinels are
``redis-server <config> --sentinel`` (Debian's ``redis-sentinel`` is a link to the same binary, so
nothing more needs installing). Each sentinel gets its own writable config file (a sentinel
rewrites it) that already names its peers and the replicas, so the setup is ready at once.

Two replicas, so that after a failover the new primary has a replica at once: the sentinels re-point
the other replica as part of the failover, while the old primary is reconfigured only when they
next poll it (``wait_demoted``; up to about 10 s later). ``start`` returns once every replica has
caught up and every sentinel knows the replicas and the other sentinels; ``close`` always stops
every process and removes the directory. Connections made here are named ``fixture``. It imports
nothing from ``relay``.
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import redis

from tests.support.redisproc import HOST, RedisServerError, free_ports, stop_processes

MASTER_NAME = "mymaster"


class LocalSentinel:
    """Controls the primary, the replicas and the sentinels of one local setup."""

    def __init__(self, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 4000, startup_timeout_s: float = 20.0) -> None:
        if shutil.which("redis-server") is None:
            raise RedisServerError("'redis-server' is not on PATH; install it (`make redis-server`)")
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.startup_timeout_s = startup_timeout_s
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []
        self._workdir = Path(tempfile.mkdtemp(prefix="relay-redis-sentinel-"))
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- addressing ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """A ``redis+sentinel://`` URL naming every sentinel, the master name and database 0."""
        if not self.sentinel_ports:
            raise RedisServerError("the setup has not been started")
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def node_client(self, port: int, **kwargs: Any) -> redis.Redis:
        """A plain client on one data node or sentinel, named ``fixture``."""
        options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5, "client_name": "fixture"}
        options.update(kwargs)
        return redis.Redis(host=HOST, port=port, **options)

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            try:
                return self._primary_seen_by(port)
            except redis.RedisError:
                continue
        raise RedisServerError("no sentinel answered")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LocalSentinel":
        """Start the primary, its replicas and the sentinels; wait until the setup can fail over."""
        try:
            first, *others = free_ports(1 + self.replica_count)
            primary = self._spawn_data(first)
            for port in others:
                self._spawn_data(port, replica_of=primary)
            for port in self.data_ports:
                self._wait(lambda port=port: self._ping(port), f"data node {port} did not answer PING")
            for port in self.data_ports[1:]:
                self._wait(lambda port=port: self._replica_in_sync(port), f"replica {port} did not sync")
            self._wait(lambda: self._replicas_caught_up(primary), "the replicas did not catch up")
            ports = free_ports(self.sentinel_count)
            ids = {port: secrets.token_hex(20) for port in ports}
            for port in ports:
                self._spawn_sentinel(port, primary, ids)
            self._wait(self._sentinels_ready, "the sentinels did not discover each other and the replica")
        except BaseException:
            self.close()
            raise
        return self

    def failover(self, timeout_s: float = 15.0) -> int:
        """``SENTINEL FAILOVER``; return the new primary's port once every sentinel's configuration
        names it and it answers as primary. The old primary is demoted later, when the sentinels next poll it
        (``wait_demoted``)."""
        old = self.primary_port()
        with self.node_client(self.sentinel_ports[0]) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

        def switched() -> bool:
            seen = {self._primary_seen_by(port) for port in self.sentinel_ports}
            return len(seen) == 1 and old not in seen and self.role(seen.pop()) == "master"

        self._wait(switched, "the failover did not complete", timeout_s)
        return self.primary_port()

    def settle(self, timeout_s: float = 30.0) -> int:
        """Wait until the sentinels agree on the primary, every replica has caught up with it (a
        former primary included), and every sentinel has seen each replica report itself as one;
        return the primary's port."""

        def settled() -> bool:
            seen = {self._primary_seen_by(port) for port in self.sentinel_ports}
            return len(seen) == 1 and self._replicas_caught_up(seen.pop()) and self._replicas_known_as_replicas()

        self._wait(settled, "the setup did not settle", timeout_s)
        return self.primary_port()

    def wait_demoted(self, port: int, timeout_s: float = 30.0) -> None:
        """Wait until the former primary on ``port`` replicates from the new one."""
        self._wait(lambda: self._replica_in_sync(port), f"{port} was not demoted", timeout_s)

    def role(self, port: int) -> str:
        """``master``, ``slave`` or ``sentinel``, as the node on ``port`` says."""
        with self.node_client(port, socket_timeout=1) as node:
            return str(node.execute_command("ROLE")[0])

    def clients(self, port: int) -> list[dict[str, Any]]:
        """``CLIENT LIST`` of the data node on ``port``."""
        with self.node_client(port, socket_timeout=1) as node:
            return list(node.client_list())

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove the working directory."""
        stop_processes(self._procs.values())
        self._procs.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "LocalSentinel":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _spawn_data(self, port: int, replica_of: Optional[int] = None) -> int:
        node_dir = self._workdir / f"data-{port}"
        node_dir.mkdir()
        args = ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", str(node_dir), "--daemonize", "no", "--protected-mode", "yes",
                "--loglevel", "warning", "--logfile", str(node_dir / "redis.log"),
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            args += ["--replicaof", HOST, str(replica_of)]
        self._procs[port] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
        self.data_ports.append(port)
        return port

    def _spawn_sentinel(self, port: int, primary: int, ids: dict[int, str]) -> None:
        """A sentinel told its peers and the replica up front (``myid``, ``known-*``), so it needs
        neither the hello messages nor the 10 s INFO period to find them."""
        node_dir = self._workdir / f"sentinel-{port}"
        node_dir.mkdir()
        config = node_dir / "sentinel.conf"
        config.write_text("\n".join([
            f"bind {HOST}", f"port {port}", "daemonize no", f"dir {node_dir}",
            f"logfile {node_dir / 'sentinel.log'}", "loglevel warning",
            f"sentinel monitor {MASTER_NAME} {HOST} {primary} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
            f"sentinel myid {ids[port]}",
            *(f"sentinel known-replica {MASTER_NAME} {HOST} {replica}" for replica in self.data_ports[1:]),
            *(f"sentinel known-sentinel {MASTER_NAME} {HOST} {peer} {peer_id}"
              for peer, peer_id in ids.items() if peer != port),
        ]) + "\n")
        self._procs[port] = subprocess.Popen(["redis-server", str(config), "--sentinel"], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sentinel_ports.append(port)

    def _wait(self, condition: Callable[[], bool], failure: str, timeout_s: Optional[float] = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while time.monotonic() < deadline:
            exited = [port for port, proc in self._procs.items() if proc.poll() is not None]
            if exited:
                raise RedisServerError(f"processes on ports {exited} exited; see {self._workdir}")
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RedisServerError(f"{failure} within {timeout_s or self.startup_timeout_s} s")

    def _ping(self, port: int) -> bool:
        with self.node_client(port, socket_timeout=1) as node:
            return bool(node.ping())

    def _replica_in_sync(self, port: int) -> bool:
        with self.node_client(port, socket_timeout=1) as node:
            info = node.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def _replicas_caught_up(self, port: int) -> bool:
        """Every replica acknowledged a write made now (``WAIT``): the initial syncs are over."""
        with self.node_client(port, socket_timeout=2) as node:
            node.set("sentinel-fixture:sync", "1")
            caught_up = int(node.execute_command("WAIT", self.replica_count, 1000)) >= self.replica_count
            node.delete("sentinel-fixture:sync")
            return caught_up

    def _replicas_known_as_replicas(self) -> bool:
        """Every sentinel's last ``INFO`` of every replica, which it asks for every 10 s, reported a
        replica. A sentinel still holding a former primary's last report as a master takes that
        node's promotion in the next failover for a stale master, converts it back to a replica
        while the promotion runs, and the failover ends in ``-failover-abort-slave-timeout``."""
        for port in self.sentinel_ports:
            with self.node_client(port, socket_timeout=1) as sentinel:
                replicas = sentinel.sentinel_slaves(MASTER_NAME)
            if len(replicas) < self.replica_count or any(
                    replica.get("role-reported") != "slave" or replica.get("is_sdown") or replica.get("is_disconnected")
                    for replica in replicas):
                return False
        return True

    def _primary_seen_by(self, sentinel_port: int) -> int:
        """The primary in the sentinel's configuration (``SENTINEL MASTERS``, what clients are told;
        ``GET-MASTER-ADDR-BY-NAME`` names the promoted replica already while the failover runs)."""
        with self.node_client(sentinel_port, socket_timeout=1) as sentinel:
            return int(sentinel.sentinel_master(MASTER_NAME)["port"])

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with self.node_client(port, socket_timeout=1) as sentinel:
                state = sentinel.sentinel_master(MASTER_NAME)
                if int(state.get("num-other-sentinels", 0)) < self.sentinel_count - 1:
                    return False
                if int(state.get("num-slaves", 0)) < self.replica_count:
                    return False
        return True
