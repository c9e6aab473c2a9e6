"""Matching and answers as envoyproxy/ratelimit documents them, on the docs' example domains."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from extsvc.config.ratelimit import RateLimitSection
from extsvc.errors import StoreError
from extsvc.observability.metrics import Metrics
from extsvc.ratelimit.algorithms import Op
from extsvc.ratelimit.config import load_domains
from extsvc.ratelimit.limiter import MAX_UINT32, DescriptorRequest, Limiter, Status
from extsvc.ratelimit.store.memory import MemoryStore

from .conftest import FakeClock

ROOT = Path(__file__).resolve().parents[2]


def limiter(clock: FakeClock, metrics: Metrics | None = None, **section: object) -> Limiter:
    config = RateLimitSection(config_dir=Path("docs/ratelimit"), **section)  # type: ignore[arg-type]
    domains, problems = load_domains(config, ROOT)
    assert problems == []
    return Limiter(config, domains, MemoryStore(clock), metrics or Metrics(), clock=clock)


def d(*entries: tuple[str, str], override: tuple[int, int] | None = None, hits: int | None = None
      ) -> DescriptorRequest:
    return DescriptorRequest(tuple(entries), override, hits)


async def run(rl: Limiter, domain: str, *descriptors: DescriptorRequest, times: int = 1,
              hits: int = 0) -> list[tuple[bool, tuple[Status, ...]]]:
    out = []
    for _ in range(times):
        answer = await rl.should_rate_limit(domain, descriptors, hits)
        out.append((answer.over, answer.statuses))
    return out


async def test_default_value_exact_value_and_whitelist(clock: FakeClock) -> None:
    rl = limiter(clock)
    clock.now = 1_700_000_020.0  # 20 s before a minute boundary
    answers = await run(rl, "gateway", d(("generic_key", "api"), ("api_key", "k1")), times=61)
    assert [a[0] for a in answers] == [False] * 60 + [True]
    first = answers[0][1][0]
    assert first.limit is not None and first.limit.name == "api"
    assert (first.remaining, first.reset_s) == (59, 20)
    partner = (await run(rl, "gateway", d(("generic_key", "api"), ("api_key", "partner-1"))))[0][1][0]
    assert partner.limit is not None and partner.limit.requests_per_unit == 600
    internal = (await run(rl, "gateway", d(("generic_key", "api"), ("api_key", "internal"))))[0][1][0]
    assert internal == Status(False)  # no rate_limit on that node: not limited, no current_limit


async def test_depth_must_match(clock: FakeClock) -> None:
    rl = limiter(clock)
    # one entry short of the configured limit, and one entry too many: no limit
    (_, statuses), = await run(rl, "gateway", d(("generic_key", "api")))
    assert statuses[0].limit is None
    (_, statuses), = await run(rl, "gateway", d(("remote_address", "1.2.3.4"), ("x", "y")))
    assert statuses[0].limit is None
    (_, statuses), = await run(rl, "gateway", d(("unknown", "x")))
    assert statuses[0] == Status(False)


async def test_wildcards_share_threshold_and_detailed_metric(clock: FakeClock) -> None:
    metrics = Metrics()
    rl = limiter(clock, metrics)
    eu = (await run(rl, "tenants", d(("tenant", "acme-eu")), times=3))[-1][1][0]
    us = (await run(rl, "tenants", d(("tenant", "acme-us"))))[-1][1][0]
    assert eu.limit is not None and eu.limit.name == "acme"
    assert (eu.remaining, us.remaining) == (997, 999)  # one counter per matching value
    await run(rl, "tenants", d(("tenant", "shared-a")), times=2)
    b = (await run(rl, "tenants", d(("tenant", "shared-b"))))[0][1][0]
    assert b.remaining == 97  # shared-* values share one counter
    other = (await run(rl, "tenants", d(("tenant", "zeta"))))[0][1][0]
    assert other.limit is not None and other.limit.requests_per_unit == 10
    gold = (await run(rl, "tenants", d(("tenant", "zeta"), ("plan", "gold"))))[0][1][0]
    assert gold.limit is not None and gold.limit.name == "gold"
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_hits_total", {"domain": "tenants", "limit": "tenant_zeta"}
    ) == 1  # detailed_metric: the request's value in the label
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_hits_total", {"domain": "tenants", "limit": "acme"}
    ) == 4


async def test_replaces_and_unlimited(clock: FakeClock) -> None:
    rl = limiter(clock)
    user, vip = d(("user", "u1")), d(("user", "u1"), ("vip", "true"))
    answers = await run(rl, "tenants", user, vip, times=10)
    assert not any(over for over, _ in answers)  # the user limit (5) was replaced
    statuses = answers[-1][1]
    assert statuses[0] == Status(False)
    assert statuses[1].limit is not None and statuses[1].limit.name == "vip"
    only_user = await run(rl, "tenants", d(("user", "u2")), times=6)
    assert only_user[-1][0] is True
    (_, statuses), = await run(rl, "tenants", d(("status", "x")))
    assert statuses[0] == Status(False, None, MAX_UINT32, 0)


async def test_hits_addend_request_and_descriptor_level(clock: FakeClock) -> None:
    rl = limiter(clock)
    key = d(("generic_key", "api"), ("api_key", "h"))
    (over, st), = await run(rl, "gateway", key, hits=0)  # 0 counts as 1
    assert st[0].remaining == 59
    (over, st), = await run(rl, "gateway", key, hits=10)
    assert st[0].remaining == 49
    (over, st), = await run(rl, "gateway", d(("generic_key", "api"), ("api_key", "h"), hits=0), hits=10)
    assert st[0].remaining == 49  # a per-descriptor 0 overrides the request: check only
    (over, st), = await run(rl, "gateway", d(("generic_key", "api"), ("api_key", "h"), hits=50))
    assert over and st[0].remaining == 0


async def test_limit_override_from_envoy(clock: FakeClock) -> None:
    rl = limiter(clock)
    over_ride = d(("generic_key", "api"), ("api_key", "o"), override=(2, 3))  # 2 per HOUR
    answers = await run(rl, "gateway", over_ride, times=3)
    assert [a[0] for a in answers] == [False, False, True]
    limit = answers[0][1][0].limit
    assert limit is not None and (limit.requests_per_unit, limit.unit, limit.window_s) == (2, 3, 3600)


async def test_shadow_mode_counts_but_allows(clock: FakeClock) -> None:
    metrics = Metrics()
    rl = limiter(clock, metrics)
    answers = await run(rl, "gateway", d(("header_match", "has_debug")), times=12)
    assert not any(over for over, _ in answers)
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_shadow_mode_total", {"domain": "gateway", "limit": "debug"}) == 2
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_over_limit_total", {"domain": "gateway", "limit": "debug"}) == 2
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_near_limit_total", {"domain": "gateway", "limit": "debug"}) == 2
    global_shadow = limiter(clock, Metrics(), shadow_mode=True)
    answers = await run(global_shadow, "gateway", d(("remote_address", "9.9.9.9")), times=52)
    assert answers[-1][0] is False and answers[-1][1][0].over is True


async def test_unknown_domain_policy(clock: FakeClock) -> None:
    metrics = Metrics()
    ok = limiter(clock, metrics)
    answer = await ok.should_rate_limit("nope", [d(("a", "b"))])
    assert not answer.over and answer.note == "unknown-domain"
    assert metrics.registry.get_sample_value("extsvc_ratelimit_unknown_domain_total") == 1
    deny = limiter(clock, over_limit={"body": "no"}, unknown_domain="over_limit")
    answer = await deny.should_rate_limit("nope", [d(("a", "b"))])
    assert answer.over and answer.body == "no"


async def test_local_cache_answers_over_limit_without_the_store(clock: FakeClock) -> None:
    metrics = Metrics()
    rl = limiter(clock, metrics, local_cache=True)
    clock.now = 1_700_000_000.0
    for _ in range(51):
        await rl.should_rate_limit("gateway", [d(("remote_address", "5.5.5.5"))])
    store = rl.store
    assert isinstance(store, MemoryStore)
    size = len(store)
    answer = await rl.should_rate_limit("gateway", [d(("remote_address", "5.5.5.5"))])
    assert answer.over
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_over_limit_local_cache_total", {"domain": "gateway", "limit": "per-ip"}) == 1
    clock.advance(1)  # the next second: a new window, the store again
    assert not (await rl.should_rate_limit("gateway", [d(("remote_address", "5.5.5.5"))])).over
    assert len(store) >= size


async def test_response_headers_from_the_closest_limit(clock: FakeClock) -> None:
    rl = limiter(clock, response_headers={"enabled": True})
    clock.now = 1_700_000_000.0
    answer = await rl.should_rate_limit(
        "gateway", [d(("generic_key", "api"), ("api_key", "r")), d(("remote_address", "7.7.7.7"))]
    )
    assert answer.headers == (("RateLimit-Limit", "50"), ("RateLimit-Remaining", "49"),
                              ("RateLimit-Reset", "1"))


class BrokenStore:
    kind = "redis"

    def __init__(self, error: BaseException | None = None, delay: float = 0.0) -> None:
        self.error, self.delay = error, delay

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        import asyncio

        await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return [(1, 0)] * len(ops)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["allow", "deny"])
@pytest.mark.parametrize("store", [BrokenStore(StoreError("down")), BrokenStore(delay=5)])
async def test_store_failure_answers_per_failure_mode(
    clock: FakeClock, mode: str, store: BrokenStore
) -> None:
    import time

    metrics = Metrics()
    base = limiter(clock)
    rl = Limiter(base.section.model_copy(update={"failure_mode": mode}), base.domains, store, metrics,
                 clock=clock)
    started = time.monotonic()
    answer = await rl.should_rate_limit(
        "gateway", [d(("remote_address", "1.1.1.1")), d(("status", "s"))], timeout_s=0.05
    )
    assert time.monotonic() - started < 1  # never past the deadline
    assert answer.note == "store-error"
    assert answer.over is (mode == "deny")
    assert metrics.registry.get_sample_value(
        "extsvc_ratelimit_store_errors_total", {"store": "redis", "answer": mode}) == 1


async def test_a_waiting_store_call_is_timed_and_an_immediate_one_is_not(clock: FakeClock) -> None:
    metrics = Metrics()
    base = limiter(clock)
    remote = Limiter(base.section, base.domains, BrokenStore(), metrics, clock=clock)
    await remote.should_rate_limit("gateway", [d(("remote_address", "1.1.1.1"))], timeout_s=1)
    await remote.should_rate_limit("gateway", [d(("remote_address", "1.1.1.1"))])
    local = limiter(clock, metrics)
    await local.should_rate_limit("gateway", [d(("remote_address", "1.1.1.1"))])
    metrics.flush()
    count = metrics.registry.get_sample_value
    assert count("extsvc_ratelimit_store_duration_seconds_count", {"store": "redis"}) == 2
    assert count("extsvc_ratelimit_store_duration_seconds_count", {"store": "memory"}) in (None, 0)
