"""``json-redact`` on hostile documents: numbers kept as written, depth capped, held bytes bounded.

Through the real stream state machine (``extsvc.testing.extproc``), as Envoy's messages arrive.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from extsvc.errors import ConfigError
from extsvc.extproc.stream import ExtprocStream
from extsvc.observability.metrics import Metrics
from extsvc.testing.extproc import body_message, headers_message, stream_for, trailers_message
from extsvc_plugins.json_redact import _too_deep

from .extproc_kit import common

POST = {":path": "/", ":method": "POST", "content-type": "application/json"}


def config(redact: str = "[password]", *, extra: str = "", policy: str = "") -> str:
    return (
        "extproc:\n  default_policy: p\n  policies:\n    p:\n"
        f"{policy}"
        f"      processors:\n        - {{plugin: json-redact, config: {{request: {redact}{extra}}}}}\n"
    )


async def buffered(text: str, metrics: Metrics | None = None) -> ExtprocStream:
    stream = await stream_for(text, metrics=metrics)
    await stream.feed(headers_message(POST, modes=("buffered", "none")))
    return stream


async def redact(body: bytes, text: str | None = None, metrics: Metrics | None = None) -> Any:
    stream = await buffered(text or config(), metrics)
    [answer] = await stream.feed(body_message(body))
    return answer


# -- numbers ---------------------------------------------------------------------------------------


async def test_numbers_are_sent_on_as_they_were_written() -> None:
    """As floats, 1e400 went upstream as ``Infinity`` (not JSON) and long decimals lost digits."""
    numbers = {
        "huge": "1e400",
        "tiny": "-1E-400",
        "exact": "0.10000000000000000000001",
        "money": "12345678901234567890.12",
        "exponent": "1.5E+3",
        "zero": "-0.0",
        "int": "123456789012345678901234567890",
    }
    fields = ",".join(f'"{name}":{text}' for name, text in numbers.items())
    body = f'{{"password":"pw",{fields},"list":[1e400,2.50]}}'.encode()
    new = common(await redact(body)).body_mutation.body
    assert new == f'{{"password":"***",{fields},"list":[1e400,2.50]}}'.encode()
    assert json.loads(new, parse_float=str, parse_int=str)["huge"] == "1e400"
    assert b"Infinity" not in new


async def test_nan_and_infinity_literals_stay_as_written() -> None:
    """Not JSON, but Python's parser reads them: they go on as they came, never as a float."""
    new = common(await redact(b'{"password":"pw","a":NaN,"b":-Infinity}')).body_mutation.body
    assert new == b'{"password":"***","a":NaN,"b":-Infinity}'


async def test_a_number_mask_and_a_masked_number() -> None:
    text = config("[card.number]", extra=", mask: 0")
    new = common(await redact(b'{"card":{"number":4111.5e1,"exp":1.10}}', text)).body_mutation.body
    assert new == b'{"card":{"number":0,"exp":1.10}}'


@pytest.mark.parametrize("mask", [".inf", ".nan", "-.inf"])
async def test_a_mask_that_is_not_json_is_refused_at_load(mask: str) -> None:
    with pytest.raises(ConfigError, match="mask must be a JSON value"):
        await stream_for(config(extra=f", mask: {mask}"))


# -- depth -----------------------------------------------------------------------------------------


def nested(depth: int, inner: str = '{"password":"pw"}') -> bytes:
    """``depth`` levels: depth - 1 arrays around one object."""
    return ("[" * (depth - 1) + inner + "]" * (depth - 1)).encode()


async def test_a_deep_document_fails_the_processor_with_the_cap_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100,000 levels: RecursionError before (a 500 by accident); now the cap, named and counted."""
    caplog.set_level(logging.WARNING)
    metrics = Metrics()
    answer = await redact(nested(100_000), config("[password]"), metrics)
    assert answer.immediate_response.status.code == 500  # on_error: fail (the default)
    assert "extsvc_processor_failed:json-redact" in answer.immediate_response.details
    [line] = [r.getMessage() for r in caplog.records if "json-redact" in r.getMessage()]
    assert "JsonTooDeep('JSON body nested deeper than max_depth=128')" in line
    assert "RecursionError" not in caplog.text
    labels = {"plugin": "json-redact", "policy": "p"}
    assert metrics.registry.get_sample_value("extsvc_plugin_json_redact_too_deep_total", labels) == 1


async def test_max_depth_is_the_deepest_document_redacted() -> None:
    """129 levels parse fine in Python: the cap, not the recursion limit, refuses them."""
    assert common(await redact(nested(128))).body_mutation.body == nested(128, '{"password":"***"}')
    assert (await redact(nested(129))).immediate_response.status.code == 500
    text = config(extra=", max_depth: 4")
    assert common(await redact(nested(4), text)).body_mutation.body == nested(4, '{"password":"***"}')
    assert (await redact(nested(5), text)).immediate_response.status.code == 500


async def test_with_on_error_continue_a_deep_document_passes_unchanged() -> None:
    text = config(policy="      on_error: continue\n")
    answer = await redact(nested(1000), text)
    assert answer.WhichOneof("response") == "request_body"
    assert not common(answer).HasField("body_mutation")


@pytest.mark.parametrize(
    ("body", "deeper_than_2"),
    [
        (b'{"a":[1]}', False),
        (b'{"a":[[1]]}', True),
        (b'{"a":"[[[[[[", "b":["]]]]"]}', False),  # brackets in strings do not count
        (b'{"a":"\\"[[[[", "b":"x\\\\", "c":[1]}', False),  # escaped quotes and backslashes
        (b'{"a":"\\\\", "b":[[{}]]}', True),
        (b'[{"k":"]"}, {"k":"["}, [{"x":[]}]]', True),
        (b'[{"[":"]"}, [[]]]', True),
    ],
)
def test_the_depth_scan(body: bytes, deeper_than_2: bool) -> None:
    assert _too_deep(body, 2) is deeper_than_2


def test_the_depth_scan_of_a_large_wide_document_is_quick() -> None:
    import time

    body = json.dumps([{"id": i, "tags": ["a", "[b"], "geo": {"lat": 1.5}} for i in range(50_000)]).encode()
    started = time.perf_counter()
    assert not _too_deep(body, 128)
    assert time.perf_counter() - started < 1.0  # a few ms; json.loads itself takes longer


# -- streamed bodies -------------------------------------------------------------------------------


async def test_a_streamed_body_over_max_bytes_stops_being_held() -> None:
    """Chunks were held until the last one whatever their sum: now at most max_bytes are
    (``incomplete: pass``; the default refuses the body, below)."""
    stream = await stream_for(config(extra=", max_bytes: 10, incomplete: pass"))
    await stream.feed(headers_message(POST, modes=("streamed", "none")))
    [first] = await stream.feed(body_message(b'{"passwo', end_of_stream=False))
    assert common(first).body_mutation.body == b""  # held: the body may still be redacted
    [second] = await stream.feed(body_message(b'rd":"pw"', end_of_stream=False))
    assert common(second).body_mutation.body == b'{"password":"pw"'  # over 10: what was held
    [third] = await stream.feed(body_message(b',"x":1}', end_of_stream=True))
    assert not common(third).HasField("body_mutation")  # and the rest as it comes


# -- bodies it cannot see whole (incomplete) ---------------------------------------------------------


def incomplete_total(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value(
        "extsvc_plugin_json_redact_incomplete_total", {"plugin": "json-redact", "policy": "p"}
    ) or 0.0


async def test_a_streamed_body_over_max_bytes_is_refused_by_default() -> None:
    metrics = Metrics()
    stream = await stream_for(config(extra=", max_bytes: 10"), metrics=metrics)
    await stream.feed(headers_message(POST, modes=("streamed", "none")))
    await stream.feed(body_message(b'{"passwo', end_of_stream=False))
    [refused] = await stream.feed(body_message(b'rd":"pw"', end_of_stream=False))
    assert refused.immediate_response.status.code == 413
    assert refused.immediate_response.details == "extsvc_json_redact_too-large"
    assert incomplete_total(metrics) == 1


@pytest.mark.parametrize(("response", "status"), [(False, 413), (True, 502)])
async def test_a_buffered_body_over_max_bytes_is_refused(response: bool, status: int) -> None:
    text = config(extra=", max_bytes: 10") if not response else config(extra=", max_bytes: 10").replace(
        "request:", "response:")
    stream = await stream_for(text)
    await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    if response:
        json_reply = {":status": "200", "content-type": "application/json"}
        await stream.feed(headers_message(json_reply, response=True))
    [answer] = await stream.feed(body_message(b'{"password":"pw!"}', response=response))
    assert answer.immediate_response.status.code == status


async def test_a_body_cut_at_envoys_buffer_limit_is_refused_or_passed_as_configured() -> None:
    cut = b'{"password":"pw","note":"nnnn'  # BUFFERED_PARTIAL, over the limit: no end_of_stream
    for extra, refused in (("", True), (", incomplete: pass", False)):
        stream = await stream_for(config(extra=extra))
        await stream.feed(headers_message(POST, modes=("buffered_partial", "none")))
        [answer] = await stream.feed(body_message(cut, end_of_stream=False))
        if refused:
            assert answer.immediate_response.status.code == 413
            assert answer.immediate_response.details == "extsvc_json_redact_partial"
        else:
            assert not common(answer).HasField("body_mutation")


async def test_a_whole_partial_mode_body_followed_by_trailers_is_redacted() -> None:
    stream = await stream_for(config())
    await stream.feed(headers_message(POST, modes=("buffered_partial", "none")))
    [answer] = await stream.feed(body_message(b'{"password":"pw"}', end_of_stream=False))
    assert json.loads(common(answer).body_mutation.body) == {"password": "***"}


async def test_full_duplex_chunks_collected_go_on_before_the_trailers() -> None:
    stream = await stream_for(config())
    await stream.feed(headers_message(POST, modes=("full_duplex_streamed", "none")))
    assert await stream.feed(body_message(b'{"password":', end_of_stream=False)) == []
    answers = await stream.feed(trailers_message({"x-t": "1"}))
    assert [a.WhichOneof("response") for a in answers] == ["request_body", "request_trailers"]
    chunk = common(answers[0]).body_mutation.streamed_response
    assert chunk.body == b'{"password":' and not chunk.end_of_stream  # not JSON: as it came
    stream = await stream_for(config())
    await stream.feed(headers_message(POST, modes=("full_duplex_streamed", "none")))
    await stream.feed(body_message(b'{"password":', end_of_stream=False))
    await stream.feed(body_message(b'"pw"}', end_of_stream=False))
    answers = await stream.feed(trailers_message({"x-t": "1"}))
    assert json.loads(common(answers[0]).body_mutation.streamed_response.body) == {"password": "***"}


async def test_streamed_chunks_cut_off_by_trailers_are_refused_whatever_incomplete_says() -> None:
    for extra in ("", ", incomplete: pass"):  # what was held is lost either way: never a 200
        stream = await stream_for(config(extra=extra))
        await stream.feed(headers_message(POST, modes=("streamed", "none")))
        await stream.feed(body_message(b'{"password":"pw"}', end_of_stream=False))
        [answer] = await stream.feed(trailers_message({"x-t": "1"}))
        assert answer.immediate_response.status.code == 500
        assert answer.immediate_response.details == "extsvc_json_redact_trailers"


async def test_it_reads_the_headers_and_trailers_of_what_it_redacts() -> None:
    stream = await stream_for(config("[]").replace("request: []", "response: [token]"))
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    mode = answer.mode_override
    # request body off; response headers kept (content-type), response trailers asked for
    assert (mode.request_body_mode, mode.response_body_mode, mode.response_header_mode) == (0, 2, 0)
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (0, 1)


async def test_collect_envoy_asks_envoy_to_buffer_streamed_bodies(caplog: pytest.LogCaptureFixture) -> None:
    stream = await stream_for(config(extra=", collect: envoy"))
    [answer] = await stream.feed(headers_message(POST, modes=("streamed", "none")))
    assert answer.mode_override.request_body_mode == 2  # BUFFERED
    [body] = await stream.feed(body_message(b'{"password":"pw"}', end_of_stream=False))
    assert json.loads(common(body).body_mutation.body) == {"password": "***"}  # whole, at once
    # Envoy ignored the override (mode_override off here): collected in extsvc, with a warning
    stream = await stream_for(config(extra=", collect: envoy", policy="      mode_override: false\n"))
    await stream.feed(headers_message(POST, modes=("streamed", "none")))
    with caplog.at_level(logging.WARNING):
        [held] = await stream.feed(body_message(b'{"password":', end_of_stream=False))
    assert common(held).body_mutation.body == b""
    assert "allow_mode_override" in caplog.text
