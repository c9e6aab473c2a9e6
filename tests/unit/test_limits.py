"""The caps of what one request may carry: the checks on Envoy's messages, and the ext_proc stream
that answers a message over a cap (the gRPC side is in tests/hostile/test_inputs.py)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from extsvc.authz.convert import to_check_context
from extsvc.extproc.convert import header_overflow
from extsvc.extproc.stream import ExtprocStream
from extsvc.limits import Rejections, RequestLimits
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse
from extsvc.settings import Settings
from extsvc.testing.extproc import body_message, header_map, headers_message, trailers_message

SMALL = RequestLimits(max_headers=10, max_header_bytes=2000, max_body_bytes=100)


def test_limits_from_settings() -> None:
    limits = RequestLimits.from_settings(Settings.load(env={}))
    assert (limits.max_headers, limits.max_header_bytes, limits.max_body_bytes) == (
        1000, 256 * 1024, 16 * 1024 * 1024
    )
    assert limits.quick_bytes == 2000
    env = {
        "EXTSVC_MAX_REQUEST_HEADERS": "50", "EXTSVC_MAX_REQUEST_HEADER_BYTES": "4096",
        "EXTSVC_MAX_REQUEST_BODY_BYTES": "0", "EXTSVC_MAX_MESSAGE_BYTES": "4194304",
    }
    limits = RequestLimits.from_settings(Settings.load(env=env))
    assert (limits.max_headers, limits.max_header_bytes, limits.max_body_bytes) == (50, 4096, 0)
    unset = Settings.load(env={"EXTSVC_MAX_MESSAGE_BYTES": "4194304"})
    assert RequestLimits.from_settings(unset).max_body_bytes == 4 * 1024 * 1024  # max_message_bytes


def check(
    headers: dict[str, str] | None = None, raw: tuple[tuple[str, str], ...] = (), body: bytes | str = b""
) -> Any:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.headers.update(headers or {})
    for key, value in raw:
        http.header_map.headers.add(key=key, raw_value=value.encode())
    if isinstance(body, str):
        http.body = body
    else:
        http.raw_body = body
    return request


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (check({f"x-{i}": "v" for i in range(10)}), None),
        (check({f"x-{i}": "v" for i in range(11)}), "header-count"),
        (check({f"x-{i}": "v" for i in range(6)}, raw=(("x-r", "v"),) * 5), "header-count"),  # both shapes
        (check(raw=(("x-r", "v"),) * 11), "header-count"),  # a repeated name counts each time
        (check({"x-a": "v" * 1997}), None),  # name + value = 2000 bytes
        (check({"x-a": "v" * 1998}), "header-bytes"),
        (check(raw=(("x-a", "v" * 1998),)), "header-bytes"),
        (check(body=b"b" * 100), None),
        (check(body=b"b" * 101), "body-bytes"),
        (check(body="\u00e9" * 51), "body-bytes"),  # 102 bytes of UTF-8 in `body`
    ],
)
def test_check_requests_against_the_caps(request_: Any, reason: str | None) -> None:
    context = to_check_context(request_, SMALL)
    if reason is None:
        assert context.over_limit is None
    else:
        assert context.over_limit is not None and context.over_limit.reason == reason
        assert dict(context.headers) == {}  # never decoded


def test_the_message_of_each_cap_names_the_setting() -> None:
    over = to_check_context(check({f"x-{i}": "v" for i in range(11)}), SMALL).over_limit
    assert over is not None and over.message == "Check: 11 headers, over max_request_headers=10"
    over = to_check_context(check({"x-a": "v" * 1998}), SMALL).over_limit
    assert over is not None and over.message == (
        "Check: 2,001 bytes of headers, over max_request_header_bytes=2,000"
    )
    over = header_overflow(header_map([("x-a", "v")] * 11), SMALL, "request_trailers")
    assert over is not None and over.message == "request_trailers: 11 headers, over max_request_headers=10"


def test_under_quick_bytes_only_the_size_is_read() -> None:
    assert SMALL.quick_bytes == 20  # 2 bytes at least per header: 20 bytes cannot carry 11
    assert to_check_context(check({"a": ""}), SMALL).over_limit is None


# -- the ext_proc stream ---------------------------------------------------------------------------

CONFIG = """
extproc:
  default_policy: p
  policies:
    p:
      processors: [{plugin: headers, config: {request: {set: {x-a: "1"}}, response: {set: {x-b: "2"}}}}]
"""


async def guarded(metrics: Metrics) -> ExtprocStream:
    runtime = await compile_config(parse(CONFIG), PluginHost.create(load_entry_points=False), metrics)
    return ExtprocStream(
        runtime.extproc, limits=SMALL, rejections=Rejections(metrics, "extproc"), authority=lambda: "x"
    )


def rejected(metrics: Metrics, reason: str) -> float:
    labels = {"service": "extproc", "reason": reason}
    return metrics.registry.get_sample_value("extsvc_request_rejected_total", labels) or 0.0


REQUEST = [(":path", "/"), (":method", "POST")]


async def test_messages_under_the_caps_are_processed() -> None:
    metrics = Metrics()
    stream = await guarded(metrics)
    [answer] = await stream.feed(headers_message(REQUEST + [("x-h", "v")] * 8, modes=("none", "none")))
    assert answer.WhichOneof("response") == "request_headers"
    [answer] = await stream.feed(headers_message([(":status", "200")], response=True))
    assert answer.WhichOneof("response") == "response_headers"
    assert stream.immediate_status is None and rejected(metrics, "header-count") == 0


async def test_request_trailers_over_a_cap_get_431_and_end_the_stream() -> None:
    metrics = Metrics()
    stream = await guarded(metrics)
    await stream.feed(headers_message(REQUEST, modes=("streamed", "none")))
    await stream.feed(body_message(b"x", end_of_stream=False))
    [answer] = await stream.feed(trailers_message({f"x-t{i}": "v" for i in range(11)}))
    assert answer.immediate_response.status.code == 431
    assert answer.immediate_response.details == "extsvc_header_count_over_limit"
    assert stream.finished and stream.immediate_status == 431 and stream.received == 3
    assert await stream.feed(headers_message([(":status", "200")], response=True)) == []
    assert rejected(metrics, "header-count") == 1


async def test_response_headers_over_a_cap_get_502() -> None:
    metrics = Metrics()
    stream = await guarded(metrics)
    await stream.feed(headers_message(REQUEST, end_of_stream=True, modes=("none", "none")))
    [answer] = await stream.feed(headers_message([(":status", "200"), ("x-big", "v" * 2000)], response=True))
    assert (answer.immediate_response.status.code, stream.policy_name) == (502, "p")
    assert rejected(metrics, "header-bytes") == 1


async def test_in_observability_mode_nothing_is_answered_but_nothing_is_decoded_either() -> None:
    metrics = Metrics()
    stream = await guarded(metrics)
    message = headers_message(REQUEST + [("x-h", "v")] * 9, modes=("none", "none"), observability=True)
    assert await stream.feed(message) == []
    assert stream.finished and not stream.exchange.has_request_headers
    assert rejected(metrics, "header-count") == 1
