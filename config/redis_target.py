"""Where Redis is: one server, a primary managed by Sentinel, or a Redis Cluster, as one URL.

``load_settings`` turns ``REDIS_URL``, ``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER`` and
``REDIS_CLUSTER`` into one canonical URL (``Settings.redis_url``); ``parse_redis_url`` reads it back
for the code that connects (``relay/stores/redis_connect.py``). The URL forms:

* ``redis://``, ``rediss://``, ``unix://``: one server, in redis-py's own syntax;
* ``redis+sentinel://[user:password@]host:port[,host:port...]/<master>[/<db>][?sentinel_password=...]``:
  the sentinels (port 26379 when left out), the master name they monitor and the database; the
  credentials are those of the data nodes, ``sentinel_password`` (optional) those of the sentinels;
* ``redis+cluster://[user:password@]host:port[,host:port...][/0]``: startup nodes of a Redis Cluster
  (port 6379 when left out; a cluster has database 0 only);
* ``rediss+sentinel://`` and ``rediss+cluster://``: the same over TLS.

Only the standard library is used here: ``config/`` imports nothing of ``relay`` or redis-py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, unquote

SINGLE, SENTINEL, CLUSTER = "single", "sentinel", "cluster"
SENTINEL_PORT = 26379
REDIS_PORT = 6379
_SCHEMES = {
    "redis": (SINGLE, False), "rediss": (SINGLE, True), "unix": (SINGLE, False),
    "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
}
ACCEPTED = "accepts redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URLs"
_HOST_PORT = re.compile(r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?$")
_MASTER = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RedisTargetError(ValueError):
    """A Redis connection setting is invalid; ``variable`` names the environment variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL. ``nodes`` are the sentinels or the cluster's startup nodes."""

    kind: str
    url: str
    ssl: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    master: Optional[str] = None
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    sentinel_password: Optional[str] = None


def parse_host_ports(text: str, default_port: int, variable: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (IPv6 hosts in brackets) into pairs; raise ``RedisTargetError``."""
    nodes = []
    for part in text.split(","):
        match = _HOST_PORT.match(part.strip())
        port = int(match.group("port")) if match and match.group("port") else default_port
        if match is None or not 1 <= port <= 65535:
            raise RedisTargetError(variable, f"accepts host:port pairs separated by commas, got {part.strip()!r}")
        nodes.append((match.group("ip6") or match.group("host"), port))
    return tuple(nodes)


def parse_redis_url(url: str, variable: str = "REDIS_URL") -> RedisTarget:
    """Read one of the URL forms of the module docstring; raise ``RedisTargetError``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise RedisTargetError(variable, ACCEPTED)
    kind, ssl = _SCHEMES[scheme.lower()]
    if kind == SINGLE:
        return RedisTarget(SINGLE, url, ssl=ssl)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hosts:
        raise RedisTargetError(variable, f"a {scheme}:// URL needs at least one host:port")
    nodes = parse_host_ports(hosts, SENTINEL_PORT if kind == SENTINEL else REDIS_PORT, variable)
    options = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
    segments = [unquote(s) for s in path.split("/") if s]
    if kind == CLUSTER:
        if options:
            raise RedisTargetError(variable, f"a {scheme}:// URL takes no query options")
        if segments not in ([], ["0"]):
            raise RedisTargetError(variable, "a Redis Cluster has database 0 only: end the URL at the hosts or /0")
        return RedisTarget(CLUSTER, url, ssl=ssl, nodes=nodes, username=username, password=password)
    unknown = sorted(set(options) - {"sentinel_password"})
    if unknown:
        raise RedisTargetError(variable, f"unknown option(s) {', '.join(unknown)}: only sentinel_password")
    if not segments or not _MASTER.match(segments[0]) or len(segments) > 2:
        raise RedisTargetError(variable, f"a {scheme}:// URL is .../<master name>[/<db>]")
    if len(segments) == 2 and not segments[1].isdigit():
        raise RedisTargetError(variable, "the database after the master name is a whole number")
    return RedisTarget(SENTINEL, url, ssl=ssl, nodes=nodes, master=segments[0],
                       db=int(segments[1]) if len(segments) == 2 else 0, username=username,
                       password=password, sentinel_password=options.get("sentinel_password") or None)


def resolve_redis_url(url: Optional[str], sentinels: Optional[str], master: Optional[str],
                      cluster: Optional[bool]) -> Optional[str]:
    """The canonical URL from ``REDIS_URL``, ``REDIS_SENTINELS``, ``REDIS_SENTINEL_MASTER`` and
    ``REDIS_CLUSTER`` (already trimmed, ``None`` when unset); raise ``RedisTargetError``."""
    if sentinels or master:
        if not sentinels:
            raise RedisTargetError("REDIS_SENTINELS", "is required with REDIS_SENTINEL_MASTER (host:port,...)")
        if not master:
            raise RedisTargetError("REDIS_SENTINEL_MASTER", "is required with REDIS_SENTINELS (the monitored name)")
        if url:
            raise RedisTargetError("REDIS_URL", "set REDIS_URL or REDIS_SENTINELS, not both (a redis+sentinel:// "
                                                "URL carries credentials)")
        if cluster:
            raise RedisTargetError("REDIS_CLUSTER", "cannot be true with REDIS_SENTINELS")
        if not _MASTER.match(master):
            raise RedisTargetError("REDIS_SENTINEL_MASTER", "accepts letters, digits, '.', '_' and '-'")
        nodes = parse_host_ports(sentinels, SENTINEL_PORT, "REDIS_SENTINELS")
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in nodes)
        return f"redis+sentinel://{hosts}/{master}"
    if not url:
        if cluster:
            raise RedisTargetError("REDIS_CLUSTER", "needs REDIS_URL (a startup node)")
        return None
    target = parse_redis_url(url)
    if cluster is None or (target.kind == CLUSTER and cluster):
        return url
    if target.kind == CLUSTER:
        raise RedisTargetError("REDIS_CLUSTER", "is false but REDIS_URL is a redis+cluster:// URL")
    if not cluster:
        return url
    if target.kind == SENTINEL:
        raise RedisTargetError("REDIS_CLUSTER", "cannot be true with a redis+sentinel:// REDIS_URL")
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "unix":
        raise RedisTargetError("REDIS_CLUSTER", "needs a redis:// or rediss:// REDIS_URL: a cluster has no unix sockets")
    cluster_url = f"{scheme.lower()}+cluster://{rest}"
    parse_redis_url(cluster_url)
    return cluster_url
