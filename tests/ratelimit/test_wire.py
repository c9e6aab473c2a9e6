"""The wire form of the rate-limit service: request bytes in, response bytes out.

The server registers ShouldRateLimit without (de)serializers; these tests hold the hand-encoded
answers equal to the protobuf ones, the parsed-request cache to what a fresh parse gives, and the
limiter's fast path for usual requests to its general path.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from extsvc.observability.metrics import Metrics
from extsvc.ratelimit.algorithms import Algorithm
from extsvc.ratelimit.config import Limit
from extsvc.ratelimit.convert import encode_response, parse_request, to_descriptors, to_response
from extsvc.ratelimit.limiter import OK_NO_LIMIT, UNLIMITED, Answer, DescriptorRequest, Status
from extsvc.testing import running_server

from .conftest import FakeClock
from .test_limiter import limiter

Response = rls_pb2.RateLimitResponse
MAX_UINT32 = 2**32 - 1

limits = st.builds(
    Limit,
    requests_per_unit=st.integers(0, MAX_UINT32),
    unit=st.sampled_from([1, 2, 3, 4, 5, 6, 7]),
    window_s=st.just(60),
    name=st.text(max_size=20),
    label=st.just("l"),
)
statuses = st.one_of(
    st.just(OK_NO_LIMIT),
    st.just(UNLIMITED),
    st.builds(Status, st.booleans(), st.none(), st.integers(0, MAX_UINT32), st.integers(0, 10**6)),
    st.builds(Status, st.booleans(), limits, st.integers(0, MAX_UINT32), st.integers(0, 10**6)),
)
answers = st.builds(
    Answer,
    st.booleans(),
    st.lists(statuses, max_size=6).map(tuple),
    st.lists(st.tuples(st.text("abc-", min_size=1, max_size=8), st.text(max_size=8)),
             max_size=3).map(tuple),
    st.text(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(answers)
def test_encoded_answers_are_the_protobuf_answers(answer: Answer) -> None:
    assert Response.FromString(encode_response(answer)) == to_response(answer)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1,
                                   2**28, MAX_UINT32])
def test_varint_boundaries(value: int) -> None:
    limit = Limit(requests_per_unit=value, unit=2, window_s=60, name="n", label="n")
    answer = Answer(False, (Status(False, limit, value, value),))
    decoded = Response.FromString(encode_response(answer)).statuses[0]
    assert decoded.current_limit.requests_per_unit == value
    assert decoded.limit_remaining == value
    assert decoded.duration_until_reset.seconds == value


def request_bytes(domain: str, *descriptors: list[tuple[str, str]], hits: int = 0) -> bytes:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    return rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[entry(key=k, value=v) for k, v in entries])
        for entries in descriptors
    ]).SerializeToString()


def test_parsed_requests_are_cached_by_their_bytes() -> None:
    raw = request_bytes("wire-cache", [("k", "v"), ("k2", "v2")], [("ip", "1.2.3.4")], hits=3)
    first = parse_request(raw)
    assert parse_request(bytes(raw)) is first  # equal bytes, another object: the same answer
    message = rls_pb2.RateLimitRequest.FromString(raw)
    assert (first.domain, list(first.descriptors), first.hits_addend) == (
        "wire-cache", to_descriptors(message), 3
    )
    other = parse_request(request_bytes("wire-cache", [("k", "other")]))
    assert other.descriptors == (DescriptorRequest((("k", "other"),)),)


def test_unreadable_bytes_raise_decode_error() -> None:
    with pytest.raises(DecodeError):
        parse_request(b"\x0a\xff\xff\xff")


# -- the limiter's fast path -----------------------------------------------------------------

def _limited_series(metrics: Metrics) -> list[tuple[str, list[tuple[str, str]], float]]:
    return sorted(
        (sample.name, sorted(sample.labels.items()), sample.value)
        for family in metrics.registry.collect() if family.name.startswith("extsvc_ratelimit")
        for sample in family.samples
    )


def _plain(answer: Answer) -> tuple[object, ...]:
    """An answer without Limit objects (each limiter loads its own domains)."""
    return answer.over, answer.headers, answer.body, [
        (s.over, s.remaining, s.reset_s, s.limit and (s.limit.name, s.limit.requests_per_unit))
        for s in answer.statuses
    ]


async def test_fast_path_answers_and_counts_like_the_general_path(clock: FakeClock) -> None:
    """A tuple of descriptors seen before is not matched again (its resolution is remembered); a
    list always is. Both limiters get the same requests across near-limit, over-limit and a
    window change."""
    fast_metrics, general_metrics = Metrics(), Metrics()
    fast, general = limiter(clock, fast_metrics), limiter(clock, general_metrics)
    # docs/ratelimit/gateway.yaml: 60 per minute per api_key (k2 counts 2 hits per request)
    request = (
        DescriptorRequest((("generic_key", "api"), ("api_key", "k1"))),
        DescriptorRequest((("generic_key", "api"), ("api_key", "k2")), hits=2),
    )
    clock.now = 1_700_000_040.0
    seen_over = False
    for step in range(75):
        if step == 70:
            clock.now += 30  # the next minute's window
        fast_answer = await fast.should_rate_limit("gateway", request, 0)
        general_answer = await general.should_rate_limit("gateway", list(request), 0)
        assert _plain(fast_answer) == _plain(general_answer), step
        seen_over = seen_over or fast_answer.over
    assert seen_over
    resolved = fast._resolved[id(request)]  # this request did take the fast path
    assert resolved.descriptors is request and all(p is not None for p in resolved.plans)
    assert general._resolved == {}
    series = _limited_series(fast_metrics)
    counted = {name for name, _, value in series if value > 0}
    assert {"extsvc_ratelimit_within_limit_total", "extsvc_ratelimit_near_limit_total",
            "extsvc_ratelimit_over_limit_total"} <= counted
    assert series == _limited_series(general_metrics)


async def test_overrides_and_unmatched_descriptors_are_remembered_too(clock: FakeClock) -> None:
    rl = limiter(clock, Metrics())
    no_limit = (DescriptorRequest((("unknown", "x"),)),)
    override = (DescriptorRequest((("generic_key", "api"), ("api_key", "k1")), override=(5, 2)),)
    for request in (no_limit, override):
        for _ in range(2):
            await rl.should_rate_limit("gateway", request, 0)
        resolved = rl._resolved[id(request)]
        assert resolved.descriptors is request
        assert (resolved.plans == [None]) is (request is override)  # an override is not cached
    assert rl._resolved[id(no_limit)].limits == [None]
    answer = await rl.should_rate_limit("gateway", override, 0)
    assert answer.statuses[0].limit is not None and answer.statuses[0].limit.requests_per_unit == 5
    assert answer.statuses[0].limit.algorithm is Algorithm.FIXED_WINDOW


# -- through the server ------------------------------------------------------------------------


async def test_unreadable_request_is_invalid_argument_and_counted(tmp_path: Path) -> None:
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "a.yaml").write_text(
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 2}\n"
    )
    (tmp_path / "extsvc.yaml").write_text("version: 1\nratelimit: {config_dir: domains}\n")
    async with running_server(tmp_path / "extsvc.yaml") as server, grpc.aio.insecure_channel(
        f"127.0.0.1:{server.grpc_port}"
    ) as channel:
        call = channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\x0a\xff\xff\xff", timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unreadable" in (caught.value.details() or "")
        good = Response.FromString(await call(request_bytes("a", [("k", "v")]), timeout=5))
        assert good.overall_code == Response.OK and good.statuses[0].limit_remaining == 1
        assert server.metrics.registry.get_sample_value(
            "extsvc_ratelimit_responses_total", {"code": "error"}
        ) == 1
