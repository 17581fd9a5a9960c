"""Where Redis is: the URL forms, the Sentinel and Cluster variables, and their refusals."""
from __future__ import annotations

import pytest

from config.redis_target import CLUSTER, SENTINEL, SINGLE, RedisTargetError, parse_redis_url, resolve_redis_url
from config.settings import ConfigError, load_settings


def test_single_server_urls_are_kept_as_given() -> None:
    for url in ("redis://h:6380/2", "rediss://:pw@h:6380/0", "unix:///run/redis.sock?db=1"):
        target = parse_redis_url(url)
        assert (target.kind, target.url) == (SINGLE, url)
    assert parse_redis_url("rediss://h").ssl is True


def test_a_sentinel_url_names_sentinels_master_database_and_credentials() -> None:
    target = parse_redis_url("redis+sentinel://app:p%40ss@s1:26380,[::1],s3/mymaster/3?sentinel_password=sp")
    assert target.kind == SENTINEL and target.ssl is False
    assert target.nodes == (("s1", 26380), ("::1", 26379), ("s3", 26379))
    assert (target.master, target.db) == ("mymaster", 3)
    assert (target.username, target.password, target.sentinel_password) == ("app", "p@ss", "sp")
    assert parse_redis_url("rediss+sentinel://s1/m").ssl is True
    assert parse_redis_url("redis+sentinel://s1/m").db == 0


def test_a_cluster_url_names_startup_nodes() -> None:
    target = parse_redis_url("redis+cluster://:pw@n1:7000,n2")
    assert target.kind == CLUSTER
    assert target.nodes == (("n1", 7000), ("n2", 6379))
    assert (target.username, target.password) == (None, "pw")
    assert parse_redis_url("rediss+cluster://n1:7000/0").ssl is True


@pytest.mark.parametrize("url, message", [
    ("http://h", "accepts redis://"),
    ("redis+sentinel://s1", "master name"),
    ("redis+sentinel://s1/m/x", "whole number"),
    ("redis+sentinel://s1/m?ssl=1", "only sentinel_password"),
    ("redis+sentinel:///m", "at least one host"),
    ("redis+cluster://n1/2", "database 0 only"),
    ("redis+cluster://n1?x=1", "no query options"),
    ("redis+cluster://n1:99999", "host:port"),
    ("redis+cluster://n1,,n2", "host:port"),
])
def test_bad_urls_say_what_is_accepted(url: str, message: str) -> None:
    with pytest.raises(RedisTargetError, match=message) as info:
        parse_redis_url(url)
    assert info.value.variable == "REDIS_URL"


def test_sentinels_and_master_become_a_sentinel_url() -> None:
    assert resolve_redis_url(None, "s1:26380, s2 ,[::1]:1", "mymaster", None) == \
        "redis+sentinel://s1:26380,s2:26379,[::1]:1/mymaster"


def test_redis_cluster_true_turns_a_server_url_into_a_cluster_url() -> None:
    assert resolve_redis_url("redis://:pw@n1:7000", None, None, True) == "redis+cluster://:pw@n1:7000"
    assert resolve_redis_url("rediss://n1:7000/0", None, None, True) == "rediss+cluster://n1:7000/0"
    assert resolve_redis_url("redis+cluster://n1", None, None, True) == "redis+cluster://n1"
    assert resolve_redis_url("redis://n1", None, None, False) == "redis://n1"
    assert resolve_redis_url(None, None, None, None) is None


@pytest.mark.parametrize("env, variable", [
    ({"REDIS_SENTINELS": "s1:26379"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:bad", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_MASTER": "m/x"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "redis://h"}, "REDIS_URL"),
    ({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_MASTER": "m", "REDIS_CLUSTER": "true"}, "REDIS_CLUSTER"),
    ({"REDIS_CLUSTER": "true"}, "REDIS_CLUSTER"),
    ({"REDIS_CLUSTER": "maybe", "REDIS_URL": "redis://h"}, "REDIS_CLUSTER"),
    ({"REDIS_CLUSTER": "true", "REDIS_URL": "unix:///run/redis.sock"}, "REDIS_CLUSTER"),
    ({"REDIS_CLUSTER": "true", "REDIS_URL": "redis+sentinel://s1/m"}, "REDIS_CLUSTER"),
    ({"REDIS_CLUSTER": "false", "REDIS_URL": "redis+cluster://n1"}, "REDIS_CLUSTER"),
    ({"REDIS_CLUSTER": "true", "REDIS_URL": "redis://n1/3"}, "REDIS_URL"),
    ({"REDIS_URL": "memcached://h"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://h", "REDIS_WAIT_REPLICAS": "-1"}, "REDIS_WAIT_REPLICAS"),
    ({"REDIS_URL": "redis://h", "REDIS_WAIT_REPLICAS": "1", "REDIS_WAIT_TIMEOUT_MS": "250"}, "REDIS_WAIT_TIMEOUT_MS"),
])
def test_settings_refuse_inconsistent_connection_variables_naming_them(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert f"{variable}:" in str(info.value)


def test_settings_carry_the_canonical_url_and_select_redis() -> None:
    sentinel = load_settings({"REDIS_SENTINELS": "s1:26379,s2:26379", "REDIS_SENTINEL_MASTER": "mymaster"})
    assert sentinel.redis_url == "redis+sentinel://s1:26379,s2:26379/mymaster"
    assert sentinel.store_backend == "redis"
    cluster = load_settings({"REDIS_URL": "redis://n1:7000", "REDIS_CLUSTER": "yes",
                             "REDIS_WAIT_REPLICAS": "1", "REDIS_WAIT_TIMEOUT_MS": "50"})
    assert cluster.redis_url == "redis+cluster://n1:7000"
    assert (cluster.redis_wait_replicas, cluster.redis_wait_timeout_ms) == (1, 50)
    assert load_settings({}).redis_wait_replicas == 0
