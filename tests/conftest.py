"""Fixtures shared by the whole test suite.

Redis:
* ``redis_session`` (session): one real ``redis-server`` on a free 127.0.0.1 port
  (never 6379), started from PATH, always stopped at the end.
* ``redis_server`` (function): that server, running, resumed and flushed before
  the test, and brought back up after it, so a test may ``stop()``, ``start()``,
  ``pause()`` and ``resume()`` it freely.
* ``unix_redis_server`` (function): a redis-server of its own that also listens on a Unix
  socket (``unix_url``); the test is skipped where the socket's path would be too long.
* ``redis_cluster`` (session): a local 3-primary Redis Cluster on free ports
  (``tests/support/rediscluster.py``), started when first asked for, always stopped at the end.
* ``fake_redis_server`` / ``fake_redis``: a fresh in-process fakeredis server and a
  ``decode_responses=True`` client on it.
"""
from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from tests.support.rediscluster import LocalRedisCluster
from tests.support.redisproc import RedisServer


# -- real redis-server ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def unix_redis_server() -> Iterator[RedisServer]:
    server = RedisServer(unix_socket=True)
    try:
        if server.unix_socket is None:
            pytest.skip("the temporary directory's path is too long for a Unix socket")
        server.start()
        yield server
    finally:
        server.close()


def _bring_back(server: RedisServer) -> None:
    server.resume()
    server.start()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> Iterator[RedisServer]:
    _bring_back(redis_session)
    client = redis_session.client()
    try:
        client.flushall()
    finally:
        client.close()
    yield redis_session
    _bring_back(redis_session)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster


# -- fakeredis --------------------------------------------------------------------------------
@pytest.fixture
def fake_redis_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(fake_redis_server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fake_redis_server, decode_responses=True)
