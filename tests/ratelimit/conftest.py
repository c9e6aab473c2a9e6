"""Fixtures of the rate-limit tests: real Redis servers, a fake clock, the store under test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from extsvc.config.ratelimit import StoreSettings, StoreType
from extsvc.ratelimit.store import LimitStore
from extsvc.ratelimit.store.builtin import build_store

from .servers import RedisCluster, RedisServer


class FakeClock:
    """Unix time that only moves when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


STORE_KINDS = ["memory", "redis", "redis-cluster"]


def store_settings(kind: str, request: pytest.FixtureRequest, **extra: object) -> StoreSettings:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("flushall")
        return StoreSettings(type=StoreType.REDIS, url=server.url, **extra)  # type: ignore[arg-type]
    if kind == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        for node in cluster.nodes:
            node.cli("flushall")
        return StoreSettings(type=StoreType.REDIS_CLUSTER, urls=cluster.urls, **extra)  # type: ignore[arg-type]
    return StoreSettings(**extra)  # type: ignore[arg-type]


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[LimitStore]:
    """The same suite on memory, a real Redis and a real 3-node Redis Cluster."""
    kind = request.param
    if kind != "memory":
        request.applymarker(pytest.mark.redis)
    built = build_store(store_settings(kind, request), clock)
    yield built
    await built.aclose()
