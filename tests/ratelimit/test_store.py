"""One store suite, run on memory, a real Redis and a real 3-node Redis Cluster."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extsvc.ratelimit import algorithms as alg
from extsvc.ratelimit.store import DeadlineStore, ImmediateStore, LimitStore
from extsvc.ratelimit.store.memory import MemoryStore

from .conftest import FakeClock


async def test_fixed_window_counts_per_window(store: LimitStore, clock: FakeClock) -> None:
    now = int(clock())
    op = alg.fixed_op("d_k_v_", 1, 60, now)
    assert op.keys[0] == f"d_k_v_{now // 60 * 60}"  # envoyproxy/ratelimit's key
    assert [(await store.apply([op]))[0][0] for _ in range(3)] == [1, 2, 3]
    assert (await store.apply([alg.fixed_op("d_k_v_", 0, 60, now)]))[0] == (3, 0)  # check only
    assert (await store.apply([alg.fixed_op("d_k_v_", 5, 60, now)]))[0] == (8, 0)
    later = now + 60
    assert (await store.apply([alg.fixed_op("d_k_v_", 1, 60, later)]))[0] == (1, 0)


async def test_sliding_window_admits_the_limit_then_decays(store: LimitStore, clock: FakeClock) -> None:
    def op(hits: int = 1) -> alg.Op:
        return alg.sliding_op("d_s_", hits, 4, 10, int(clock() * 1000))

    clock.now = 1_700_000_000.0  # the start of a 10 s window
    results = [(await store.apply([op()]))[0] for _ in range(5)]
    assert results == [(1, 1), (1, 2), (1, 3), (1, 4), (0, 4)]  # the 5th is rejected, not counted
    clock.advance(10)  # next window starts: the previous counts fully
    assert (await store.apply([op()]))[0] == (0, 4)
    clock.advance(5)  # half-way: 4 * 0.5 = 2 remain from before
    assert [(await store.apply([op()]))[0] for _ in range(3)] == [(1, 3), (1, 4), (0, 4)]


async def test_token_bucket_burst_then_rate(store: LimitStore, clock: FakeClock) -> None:
    def op(hits: int = 1) -> alg.Op:
        # 10 per 10 s (one per second), burst 3
        return alg.gcra_op("d_g_", hits, 10, 3, 10, int(clock() * 1_000_000))

    admitted = [(await store.apply([op()]))[0][0] for _ in range(4)]
    assert admitted == [1, 1, 1, 0]
    clock.advance(1.0)
    assert [(await store.apply([op()]))[0][0] for _ in range(2)] == [1, 0]
    clock.advance(10)
    assert (await store.apply([op(3)]))[0][0] == 1  # the bucket is full again
    assert (await store.apply([op(0)]))[0][0] == 1  # zero hits: a check, always fits


async def test_one_call_applies_every_op_in_order(store: LimitStore, clock: FakeClock) -> None:
    now = clock()
    ops = [
        alg.fixed_op("d_a_1_", 2, 60, int(now)),
        alg.sliding_op("d_b_2_", 1, 5, 60, int(now * 1000)),
        alg.gcra_op("d_c_3_", 1, 5, 5, 60, int(now * 1_000_000)),
        alg.fixed_op("d_a_1_", 1, 60, int(now)),
    ]
    results = await store.apply(ops)
    assert [r[0] for r in results] == [2, 1, 1, 3]


async def test_same_answers_as_the_reference_model(store: LimitStore, clock: FakeClock) -> None:
    """A long random sequence gives exactly the memory store's answers (Lua == Python)."""
    model = MemoryStore(clock)
    rng = random.Random(7)
    for _ in range(150):
        clock.advance(rng.choice([0, 0, 0.05, 0.3, 1.7, 11]))
        now = clock()
        ops = []
        for _ in range(rng.randint(1, 3)):
            kind, hits = rng.choice("fsg"), rng.choice([0, 1, 1, 1, 2, 5])
            limit, window = rng.choice([(3, 1), (5, 10), (20, 60)])
            key = f"d_{kind}{limit}_{rng.randint(0, 2)}_"  # a descriptor has one limit
            if kind == "f":
                ops.append(alg.fixed_op(key, hits, window, int(now)))
            elif kind == "s":
                ops.append(alg.sliding_op(key, hits, limit, window, int(now * 1000)))
            else:
                ops.append(alg.gcra_op(key, hits, limit, limit, window, int(now * 1_000_000)))
        assert await store.apply(ops) == await model.apply(ops)


@pytest.mark.redis
async def test_one_round_trip_per_request(request: pytest.FixtureRequest, clock: FakeClock) -> None:
    from extsvc.ratelimit.store.builtin import build_store

    from .conftest import store_settings

    server = request.getfixturevalue("redis_server")
    redis_store = build_store(store_settings("redis", request), clock)
    try:
        now = clock()
        ops = [alg.fixed_op(f"d_k_{i}_", 1, 60, int(now)) for i in range(3)]
        await redis_store.apply(ops)  # loads the script if needed
        before = server.commandstats()
        for _ in range(10):
            await redis_store.apply(ops)
        after = server.commandstats()
        calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        # commandstats also counts the commands a script runs (incrby, pexpire, ...)
        inside = {"incrby", "pexpire", "get", "set", "info"}
        assert {k: v for k, v in calls.items() if v and k not in inside} == {"evalsha": 10}
    finally:
        await redis_store.aclose()


@pytest.mark.redis
async def test_cluster_hash_tag_puts_a_request_in_one_slot(
    request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    from extsvc.config.ratelimit import RateLimitSection
    from extsvc.observability.metrics import Metrics
    from extsvc.ratelimit.config import DomainSet, parse_domain
    from extsvc.ratelimit.limiter import DescriptorRequest, Limiter
    from extsvc.ratelimit.store.builtin import build_store

    from .conftest import store_settings

    cluster = request.getfixturevalue("redis_cluster")
    settings = store_settings("redis-cluster", request, hash_tag=True, key_prefix="rl:")
    section = RateLimitSection(files=[], config_dir=".", store=settings)  # type: ignore[arg-type]
    domain = parse_domain(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: minute, requests_per_unit: 2}\n",
        "d.yaml",
    )
    cluster_store = build_store(settings, clock)
    limiter = Limiter(section, DomainSet({"d": domain}), cluster_store, Metrics(), clock=clock)
    try:
        descriptors = [DescriptorRequest((("a", str(i)),)) for i in range(8)]
        before = [n.commandstats().get("evalsha", 0) for n in cluster.nodes]
        answers = [await limiter.should_rate_limit("d", descriptors) for _ in range(3)]
        after = [n.commandstats().get("evalsha", 0) for n in cluster.nodes]
        assert [a.over for a in answers] == [False, False, True]
        assert sum(after) - sum(before) == 3  # one script call per request, on one node
        keys = [k for n in cluster.nodes for k in n.cli("keys", "*").split()]
        assert len(keys) == 8 and all(k.startswith("rl:{d}_a_") for k in keys)
    finally:
        await cluster_store.aclose()


@given(
    st.lists(
        st.tuples(st.sampled_from("fsg"), st.text(min_size=1, max_size=12), st.integers(0, 10**6),
                  st.integers(0, 10**12)),
        min_size=1, max_size=5,
    )
)
def test_evalsha_encoding_is_the_generic_one(specs: list[tuple[str, str, int, int]]) -> None:
    """The Redis store's cached EVALSHA encoding is byte for byte the generic RESP encoding."""
    from extsvc.ratelimit.store.redis import LUA_SHA, _evalsha, _flatten
    from extsvc.ratelimit.store.resp import encode

    ops = []
    for kind, key, hits, now in specs:
        if kind == "f":
            ops.append(alg.fixed_op(key, hits, 60, now))
        elif kind == "s":
            ops.append(alg.sliding_op(key, hits, 10, 60, now))
        else:
            ops.append(alg.gcra_op(key, hits, 10, 5, 60, now))
    keys, args = _flatten(ops)
    expected = encode(["EVALSHA", LUA_SHA, len(keys), *keys, *args])
    assert _evalsha(ops) == expected
    assert _evalsha(ops) == expected  # from the cache


async def test_optional_capabilities_are_declared_protocols(store: LimitStore) -> None:
    """What the limiter looks for once when it is built: memory answers without waiting (never
    bounded by the RPC's deadline), Redis bounds its own call; a plugin store wrapper neither."""
    from extsvc.ratelimit.store.plugin import PluginStore

    assert isinstance(store, ImmediateStore) is (store.kind == "memory")
    assert isinstance(store, DeadlineStore) is (store.kind == "redis")
    wrapped = PluginStore("other", store)
    assert not isinstance(wrapped, ImmediateStore) and not isinstance(wrapped, DeadlineStore)
