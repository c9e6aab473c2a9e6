"""Tracing of a running server, exported over OTLP/gRPC to a collector on loopback: the caller's
context from B3 as well as W3C metadata, sampling, failing steps, rate-limit attributes.
(Envoy's own traces continuing into extsvc's: tests/e2e/test_insights.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extsvc.app import ExtsvcServer
from extsvc.plugin.host import PluginHost
from extsvc.testing import ScriptPlugin, authz_stub, check_request, running_server
from extsvc.testing.otlp import OtlpCollector, ReceivedSpan

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CONFIG = """\
version: 1
default_policy: p
policies:
  p:
    steps:
      - {name: first, plugin: script, config: {answer: abstain}}
      - {name: broken, plugin: script, config: {answer: raise}}
ratelimit: {config_dir: domains}
"""
DOMAIN = """\
domain: d
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 1, name: per-user}
"""
CHECK = "envoy.service.auth.v3.Authorization/Check"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "d.yaml").write_text(DOMAIN)
    (tmp_path / "extsvc.yaml").write_text(CONFIG)
    return tmp_path / "extsvc.yaml"


@asynccontextmanager
async def traced(
    collector: OtlpCollector, config: Path, **settings: Any
) -> AsyncIterator[ExtsvcServer]:
    host = PluginHost.create(extra_plugins=[("script", ScriptPlugin())], load_entry_points=False)
    async with running_server(config, host=host, tracing_endpoint=collector.endpoint,
                              **settings) as server:
        yield server


def _rpc_spans(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


async def test_b3_and_w3c_parents_are_continued_and_a_failed_step_is_an_error_span(
    config: Path,
) -> None:
    with OtlpCollector() as collector:
        async with traced(collector, config) as server, grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}"
        ) as channel:
            check = authz_stub(channel).Check
            for metadata in (
                (("traceparent", f"00-{TRACE}-{PARENT}-01"),),
                (("x-b3-traceid", TRACE), ("x-b3-spanid", "1111111111111111"),
                 ("x-b3-sampled", "1")),
                (("b3", f"{TRACE}-2222222222222222-1"),),
            ):
                answer = await check(check_request("/"), metadata=metadata)
                assert answer.status.code != 0  # the raising step: on_error deny
            assert server.tracing is not None and server.tracing.flush()
        spans = collector.wait_for(lambda s: len(_rpc_spans(s, CHECK)) == 3)
    checks = _rpc_spans(spans, CHECK)
    assert {s.trace_id for s in checks} == {TRACE}
    assert sorted(s.parent_span_id for s in checks) == sorted(
        [PARENT, "1111111111111111", "2222222222222222"])
    for rpc in checks:
        assert rpc.attributes["extsvc.decision"] == "error"
        assert rpc.status_code == 2  # ERROR
        steps = sorted((s for s in spans if s.parent_span_id == rpc.span_id),
                       key=lambda s: s.start_ns)
        assert [(s.name, s.attributes["extsvc.step.outcome"], s.status_code) for s in steps] == [
            ("step first", "abstain", 0), ("step broken", "error", 2)]


async def test_sampling_follows_the_caller_and_the_ratio_decides_new_traces(config: Path) -> None:
    with OtlpCollector() as collector:
        async with traced(collector, config, tracing_sample_ratio=0.0) as server, grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}"
        ) as channel:
            check = authz_stub(channel).Check
            for _ in range(5):  # no caller context: the ratio (0) decides
                await check(check_request("/"))
            for unsampled in (
                (("traceparent", f"00-{TRACE}-{PARENT}-00"),),
                (("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT), ("x-b3-sampled", "0")),
                (("b3", f"{TRACE}-{PARENT}-0"),),
                (("b3", "0"),),
            ):  # the caller said "not sampled"
                await check(check_request("/"), metadata=unsampled)
            await check(check_request("/"), metadata=(("traceparent", f"00-{TRACE}-{PARENT}-01"),))
            assert server.tracing is not None and server.tracing.flush()
        spans = collector.wait_for(lambda s: len(_rpc_spans(s, CHECK)) >= 1)
    # only the caller's sampled trace was recorded
    assert [(s.trace_id, s.parent_span_id) for s in _rpc_spans(spans, CHECK)] == [(TRACE, PARENT)]


def _limit(user: str) -> Any:
    return rls_pb2.RateLimitRequest(domain="d", descriptors=[ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value=user)])])


async def test_rate_limit_spans_carry_domain_and_outcome_and_values_only_when_asked(
    config: Path,
) -> None:
    name = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    for values in (False, True):
        with OtlpCollector() as collector:
            async with traced(collector, config, tracing_descriptor_values=values) as server, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                limit = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit
                codes = [(await limit(_limit("zoe"))).overall_code for _ in range(2)]
                assert codes == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]
                assert server.tracing is not None and server.tracing.flush()
            spans = collector.wait_for(lambda s: len(_rpc_spans(s, name)) == 2)
        ok, over = sorted(_rpc_spans(spans, name), key=lambda s: s.start_ns)
        assert ok.attributes["extsvc.ratelimit.domain"] == "d"
        assert ok.attributes["extsvc.ratelimit.outcome"] == "ok"
        assert over.attributes["extsvc.ratelimit.outcome"] == "over_limit"
        assert over.attributes["extsvc.ratelimit.over_limits"] == ["per-user"]
        assert over.attributes["extsvc.ratelimit.descriptors"] == ("user=zoe" if values else "user")
