"""The ext_proc stream state machine, fed events (docs/internals/envoy-behaviour.md §3)."""

from __future__ import annotations

import pytest

from extsvc.errors import ConfigError
from extsvc.extproc.stream import ExtprocStream, ProtocolError
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse
from extsvc.testing import ScriptPlugin
from extsvc.testing.extproc import body_message, headers_message, stream_for, trailers_message

from .extproc_kit import common, scripted_stream, set_headers, which

POST = {":path": "/orders", ":method": "POST", ":authority": "a", "content-type": "application/json",
        "content-length": "23", "x-request-id": "rid-1"}
BODY = b'{"item":"book","qty":2}'
ONLY_REQUEST_HEADERS = "processors: [{plugin: script, config: {phases: [request_headers]}}]"


@pytest.fixture
def plugin() -> ScriptPlugin:
    return ScriptPlugin()


async def feed_all(stream, *messages):  # type: ignore[no-untyped-def]
    out = []
    for message in messages:
        out.append(await stream.feed(message))
    return out


# -- phases and order [1, 2, 17, 18] ---------------------------------------------------------


async def test_buffered_post_gets_one_matching_answer_per_phase(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: {phases: "
                                   "[request_headers, request_body, response_headers, response_body]}}]")
    answers = await feed_all(
        stream,
        headers_message(POST, modes=("buffered", "buffered")),
        body_message(BODY),
        headers_message({":status": "200", "content-length": "2"}, response=True),
        body_message(b"{}", response=True),
    )
    assert [[which(a) for a in batch] for batch in answers] == [
        ["request_headers"], ["request_body"], ["response_headers"], ["response_body"]
    ]
    assert [c[1].value for c in plugin.processed] == [
        "request_headers", "request_body", "response_headers", "response_body"
    ]
    assert not answers[0][0].HasField("mode_override")  # every phase is needed
    assert (stream.received, stream.sent) == (4, 4)


async def test_get_without_body_and_no_body_message_after_end_of_stream(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, ONLY_REQUEST_HEADERS)
    [answer] = await stream.feed(headers_message({":path": "/", ":method": "GET"}, end_of_stream=True,
                                                 modes=("none", "none")))
    assert which(answer) == "request_headers"
    with pytest.raises(ProtocolError, match="after that direction ended") as caught:
        await stream.feed(body_message(b"late"))
    assert caught.value.reason == "order"


async def test_a_stream_may_begin_with_response_headers(plugin: ScriptPlugin) -> None:
    # An earlier filter (ext_authz 403) answered locally: only the response path reaches ext_proc.
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: {phases: "
                                   "[request_headers, response_headers], set: {x-seen: '1'}}}]")
    [answer] = await stream.feed(headers_message({":status": "403"}, response=True, modes=("none", "none")))
    assert which(answer) == "response_headers"
    assert set_headers(common(answer).header_mutation) == [("x-seen", b"1", False)]
    assert stream.exchange.request_headers == {}
    assert stream.exchange.request_done is None


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([headers_message(POST), headers_message(POST)], "after headers or body"),
        ([body_message(b"x", end_of_stream=False), headers_message(POST)], "after headers or body"),
        ([headers_message(POST), trailers_message({"t": "1"}), body_message(b"x")], "direction ended"),
        ([headers_message(POST), body_message(b"x"), trailers_message({"t": "1"})], "direction ended"),
        ([headers_message({":status": "200"}, response=True, end_of_stream=True),
          body_message(b"x", response=True)], "direction ended"),
    ],
    ids=["headers-twice", "headers-after-body", "body-after-trailers", "trailers-after-eos",
         "response-body-after-eos"],
)
async def test_protocol_errors(plugin: ScriptPlugin, messages: list[object], match: str) -> None:
    stream = await scripted_stream(plugin, "processors: []")
    with pytest.raises(ProtocolError, match=match):
        await feed_all(stream, *messages)


async def test_an_empty_message_is_a_protocol_error(plugin: ScriptPlugin) -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    stream = await scripted_stream(plugin, "processors: []")
    with pytest.raises(ProtocolError) as caught:
        await stream.feed(pb.ProcessingRequest())
    assert caught.value.reason == "empty"


async def test_request_and_response_directions_may_interleave(plugin: ScriptPlugin) -> None:
    # FULL_DUPLEX / early upstream replies: the response may start before the request ends.
    stream = await scripted_stream(plugin, "processors: []")
    answers = await feed_all(
        stream,
        headers_message(POST, modes=("streamed", "streamed")),
        body_message(b"a", end_of_stream=False),
        headers_message({":status": "200"}, response=True),
        body_message(b"b"),
        body_message(b"c", response=True),
    )
    assert [which(a[0]) for a in answers] == [
        "request_headers", "request_body", "response_headers", "request_body", "response_body"
    ]


async def test_protocol_config_and_attributes_come_from_the_first_message(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: {phases: "
                                   "[request_body, response_body]}}]")
    await stream.feed(headers_message(POST, modes=("streamed", "buffered"),
                                      attributes={"request.path": "/orders"}))
    await stream.feed(headers_message({":status": "200"}, response=True,
                                      attributes={"response.code": 200}))
    exchange = stream.exchange
    assert (exchange.request_body_mode.value, exchange.response_body_mode.value) == ("streamed", "buffered")
    assert exchange.attributes == {"request.path": "/orders", "response.code": 200.0}


# -- observability mode (docs/internals/envoy-behaviour.md §3.8) ---------------------------------


async def test_observability_mode_runs_processors_but_answers_nothing(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_headers, request_body], respond: 403}}]")
    assert await stream.feed(headers_message(POST, modes=("streamed", "none"), observability=True)) == []
    assert await stream.feed(body_message(b"x", observability=True)) == []
    assert len(plugin.processed) == 2
    assert stream.sent == 0


# -- answers: mutations, immediate responses, replace [2, 5, 6, 8, 10, 13, 15, 16, 19] ------------


async def test_header_mutations_use_raw_value_and_the_append_bool(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, """
processors:
  - {plugin: script, config: {phases: [request_headers], set: {x-a: "1", x-gone: "2"}, append: {x-b: "3"}}}
  - {plugin: script, name: second, config: {phases: [request_headers], remove: [x-gone, x-drop]}}
""")
    [answer] = await stream.feed(headers_message({**POST, "x-drop": "d", "x-b": "0"}))
    mutation = common(answer).header_mutation
    assert set_headers(mutation) == [("x-a", b"1", False), ("x-b", b"3", True)]
    assert list(mutation.remove_headers) == ["x-gone", "x-drop"]
    # the second processor saw the first one's changes
    assert plugin.processed[1][2]["x-a"] == "1" and plugin.processed[1][2]["x-b"] == "0,3"
    assert stream.exchange.request_headers["x-b"] == "0,3"
    assert "x-drop" not in stream.exchange.request_headers


async def test_request_drain_is_never_set(plugin: ScriptPlugin) -> None:
    # docs/internals/envoy-behaviour.md §1.2: field 11 is streamed_immediate_response in Envoy 1.40.
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_headers], set: {x: y}}}]")
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "none")))
    assert not answer.request_drain
    assert b"\x58" not in answer.SerializeToString()[:1]


@pytest.mark.parametrize(
    "phase",
    ["request_headers", "request_body", "request_trailers", "response_headers", "response_body",
     "response_trailers"],
)
async def test_immediate_response_from_any_phase_ends_the_stream(plugin: ScriptPlugin, phase: str) -> None:
    stream = await scripted_stream(plugin, f"processors: [{{plugin: script, config: "
                                   f"{{phases: [{phase}], respond: 418}}}}]")
    messages = [
        headers_message(POST, modes=("buffered", "buffered")),
        body_message(BODY, end_of_stream=False),
        trailers_message({"x-t": "1"}),
        headers_message({":status": "200"}, response=True),
        body_message(b"{}", response=True, end_of_stream=False),
        trailers_message({"x-t": "2"}, response=True),
    ]
    answers = await feed_all(stream, *messages)
    hit = [i for i, batch in enumerate(answers) if batch and which(batch[0]) == "immediate_response"]
    assert len(hit) == 1
    reply = answers[hit[0]][0].immediate_response
    assert (reply.status.code, reply.body, reply.details) == (418, b"stopped\n", "scripted")
    assert set_headers(reply.headers) == [("x-stopped-by", b"script", False)]
    assert all(batch == [] for batch in answers[hit[0] + 1:])  # Envoy ignores the rest
    assert stream.finished and stream.immediate_status == 418


async def test_continue_and_replace_stops_processing_that_direction(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: {phases: "
                                   "[request_headers, request_body], body: 'injected', replace: true}}]")
    get = headers_message({":path": "/", ":method": "GET"}, modes=("buffered", "none"))
    [answer] = await stream.feed(get)
    response = common(answer)
    assert response.status == 1  # CONTINUE_AND_REPLACE
    assert response.body_mutation.body == b"injected"
    # If Envoy still sent the body, it passes untouched and the processor is not called again.
    [later] = await stream.feed(body_message(b"late"))
    assert which(later) == "request_body" and not later.request_body.HasField("response")
    assert len(plugin.processed) == 1


async def test_trailers_are_mutated_with_a_trailers_response(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: {phases: "
                                   "[request_trailers], set: {x-checksum: ok}, remove: [x-t]}}]")
    await stream.feed(headers_message(POST, modes=("none", "none")))
    [answer] = await stream.feed(trailers_message({"x-t": "1"}))
    assert which(answer) == "request_trailers"
    mutation = answer.request_trailers.header_mutation
    assert set_headers(mutation) == [("x-checksum", b"ok", False)]
    assert list(mutation.remove_headers) == ["x-t"]
    assert plugin.processed[0][2] == {"x-t": "1"}


async def test_dynamic_metadata_and_clear_route_cache(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: {phases: "
                                   "[request_headers], set: {':path': /v2}, route_cache: true, "
                                   "metadata: {tier: gold, n: 2}}}]")
    [answer] = await stream.feed(headers_message(POST, modes=("none", "none")))
    assert common(answer).clear_route_cache
    assert dict(answer.dynamic_metadata["ext_proc.demo"]) == {"tier": "gold", "n": 2.0}


# -- body modes [2, 8, 9, 11] -------------------------------------------------------------------


async def test_buffered_body_change_sets_content_length_in_the_same_answer(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_body], body: 'a much longer body than before'}}]")
    await stream.feed(headers_message(POST, modes=("buffered", "none")))
    [answer] = await stream.feed(body_message(BODY))
    response = common(answer)
    assert response.body_mutation.body == b"a much longer body than before"
    assert ("content-length", b"30", False) in set_headers(response.header_mutation)


async def test_buffered_clear_body_sets_content_length_zero(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_body], clear_body: true}}]")
    await stream.feed(headers_message(POST, modes=("buffered", "none")))
    [answer] = await stream.feed(body_message(BODY))
    response = common(answer)
    assert response.body_mutation.clear_body
    assert set_headers(response.header_mutation) == [("content-length", b"0", False)]


async def test_same_length_change_needs_no_content_length(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_body], upper: true}}]")
    await stream.feed(headers_message(POST, modes=("buffered", "none")))
    [answer] = await stream.feed(body_message(BODY))
    assert common(answer).body_mutation.body == BODY.upper()
    assert set_headers(common(answer).header_mutation) == []


@pytest.mark.parametrize("mode", ["streamed", "buffered_partial"])
async def test_streamed_and_partial_bodies_get_no_content_length(plugin: ScriptPlugin, mode: str) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_body], body: 'xx'}}]")
    await stream.feed(headers_message(POST, modes=(mode, "none")))
    [answer] = await stream.feed(body_message(BODY))
    assert set_headers(common(answer).header_mutation) == []


async def test_streamed_chunks_are_answered_one_by_one_in_order(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_body], upper: true}}]")
    await stream.feed(headers_message(POST, modes=("streamed", "none")))
    chunks = [b"ab", b"cd", b""]
    answers = [await stream.feed(body_message(c, end_of_stream=i == 2)) for i, c in enumerate(chunks)]
    assert [len(a) for a in answers] == [1, 1, 1]
    assert [common(a[0]).body_mutation.body for a in answers[:2]] == [b"AB", b"CD"]
    assert [c[3] for c in plugin.processed] == chunks


async def test_full_duplex_answers_with_streamed_response_chunks(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_headers, request_body], upper: true}}]")
    [first] = await stream.feed(headers_message(POST, modes=("full_duplex_streamed", "none")))
    assert not first.HasField("mode_override")  # unsupported in FULL_DUPLEX_STREAMED
    a = await stream.feed(body_message(b"ab", end_of_stream=False))
    empty = await stream.feed(body_message(b"", end_of_stream=False))
    last = await stream.feed(body_message(b"cd", end_of_stream=True))
    assert empty == []  # nothing to pass on: no answer needed in full duplex
    chunks = [common(x[0]).body_mutation.streamed_response for x in (a, last)]
    assert [(c.body, c.end_of_stream) for c in chunks] == [(b"AB", False), (b"CD", True)]


async def test_full_duplex_without_processors_echoes_chunks(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: []")
    await stream.feed(headers_message(POST, modes=("none", "full_duplex_streamed")))
    await stream.feed(headers_message({":status": "200"}, response=True))
    [answer] = await stream.feed(body_message(b"xyz", response=True, end_of_stream=True))
    chunk = common(answer).body_mutation.streamed_response
    assert (chunk.body, chunk.end_of_stream) == (b"xyz", True)


# -- mode_override [12] --------------------------------------------------------------------------


async def test_override_switches_off_unneeded_phases_with_both_body_modes(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_headers], set: {x: '1'}}}]")
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    mode = answer.mode_override
    assert answer.HasField("mode_override")
    assert (mode.request_body_mode, mode.response_body_mode) == (0, 0)   # NONE, NONE
    assert mode.response_header_mode == 2  # SKIP
    assert (mode.request_header_mode, mode.request_trailer_mode, mode.response_trailer_mode) == (0, 0, 0)
    assert stream.override_sent


async def test_override_asks_for_the_trailers_the_policy_needs(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(
        plugin, "processors: [{plugin: script, config: {phases: [request_trailers, response_trailers]}}]"
    )
    [answer] = await stream.feed(headers_message({":path": "/"}, modes=("buffered", "none")))
    mode = answer.mode_override
    assert (mode.request_body_mode, mode.response_header_mode) == (0, 2)  # NONE, SKIP
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (1, 1)  # SEND both
    # A policy that needs no trailers leaves them DEFAULT (Envoy then stops sending them).
    other = await scripted_stream(plugin, ONLY_REQUEST_HEADERS)
    [answer] = await other.feed(headers_message({":path": "/"}, modes=("buffered", "none")))
    assert (answer.mode_override.request_trailer_mode, answer.mode_override.response_trailer_mode) == (0, 0)


async def test_override_keeps_the_needed_body_mode(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_body, response_headers]}}]")
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    mode = answer.mode_override
    assert (mode.request_body_mode, mode.response_body_mode, mode.response_header_mode) == (2, 0, 0)


async def test_override_on_a_stream_that_begins_with_response_headers(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, ONLY_REQUEST_HEADERS.replace("request_", "response_"))
    [answer] = await stream.feed(headers_message({":status": "403"}, response=True,
                                                 modes=("buffered", "buffered")))
    assert answer.HasField("mode_override")
    assert answer.mode_override.response_body_mode == 0
    assert answer.mode_override.response_header_mode == 0


async def test_override_keeps_the_response_headers_a_processor_reads(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [response_body], reads: [response_headers]}}]")
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    mode = answer.mode_override
    assert (mode.request_body_mode, mode.response_body_mode, mode.response_header_mode) == (0, 2, 0)
    # and the message is answered unchanged, without a hook for it
    reply = headers_message({":status": "200", "content-type": "a/b"}, response=True)
    [headers] = await stream.feed(reply)
    assert which(headers) == "response_headers" and plugin.processed == []
    await stream.feed(body_message(b"x", response=True))
    assert plugin.processed[0].headers["content-type"] == "a/b"


async def test_override_never_skips_the_headers_of_a_response_whose_body_is_wanted(
    plugin: ScriptPlugin,
) -> None:
    # Envoy 1.40 with response headers skipped never ends a BUFFERED_PARTIAL response over its
    # buffer limit and cuts a BUFFERED one (docs/internals/envoy-behaviour.md §3.4).
    stream = await scripted_stream(
        plugin, "processors: [{plugin: script, config: {phases: [response_body]}}]"
    )
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    assert answer.mode_override.response_header_mode == 0  # DEFAULT: as configured


@pytest.mark.parametrize(
    ("configured", "whole", "expected"),
    [
        (("streamed", "streamed"), True, (2, 2)),              # BUFFERED both ways
        (("buffered_partial", "buffered_partial"), True, (2, 2)),
        (("buffered_partial", "buffered_partial"), False, (3, 2)),  # a response's: always BUFFERED
        (("streamed", "streamed"), False, (1, 1)),
    ],
)
async def test_override_buffers_bodies_a_processor_needs_whole(
    plugin: ScriptPlugin, configured: tuple[str, str], whole: bool, expected: tuple[int, int]
) -> None:
    phases = "[request_body, response_body]"
    extra = f", whole_bodies: {phases}" if whole else ""
    policy = f"processors: [{{plugin: script, config: {{phases: {phases}{extra}}}}}]"
    stream = await scripted_stream(plugin, policy)
    [answer] = await stream.feed(headers_message(POST, modes=configured))
    mode = answer.mode_override
    if expected == (1, 1):
        assert not answer.HasField("mode_override")
    else:
        assert (mode.request_body_mode, mode.response_body_mode) == expected
    # the stream now takes the bodies in the mode Envoy was asked for
    assert stream.exchange.request_body_mode.value == (
        "buffered" if expected[0] == 2 else configured[0]
    )


async def test_a_trailers_message_carries_a_collected_body_in_full_duplex(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                   "{phases: [request_trailers], body: 'collected'}}]")
    await stream.feed(headers_message(POST, modes=("full_duplex_streamed", "none")))
    answers = await stream.feed(trailers_message({"x-t": "1"}))
    assert [which(a) for a in answers] == ["request_body", "request_trailers"]
    chunk = common(answers[0]).body_mutation.streamed_response
    assert (chunk.body, chunk.end_of_stream) == (b"collected", False)
    # in other modes a trailers message has no body to carry: one answer
    other = await scripted_stream(plugin, "processors: [{plugin: script, config: "
                                  "{phases: [request_trailers], body: 'collected'}}]")
    await other.feed(headers_message(POST, modes=("streamed", "none")))
    assert [which(a) for a in await other.feed(trailers_message({"x-t": "1"}))] == ["request_trailers"]


BODY_ONLY = "processors: [{plugin: script, config: {phases: [request_body]}}]"


async def test_a_body_whose_end_never_came_is_told_apart(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, BODY_ONLY)
    await stream.feed(headers_message(POST, modes=("streamed", "none")))
    await stream.feed(body_message(b"a", end_of_stream=False))
    assert stream.body_unfinished
    await stream.feed(body_message(b"b", end_of_stream=True))
    assert not stream.body_unfinished
    buffered = await scripted_stream(plugin, BODY_ONLY)
    await buffered.feed(headers_message(POST, modes=("buffered", "none")))
    await buffered.feed(body_message(b"a", end_of_stream=False))  # trailers to follow, or skipped
    assert not buffered.body_unfinished  # a BUFFERED body is whole


@pytest.mark.parametrize(
    ("policy", "modes", "no_wait"),
    [
        ("processors: [{plugin: script, config: {phases: [request_headers]}}]\nmode_override: false",
         ("buffered", "buffered"), False),
        ("processors: [{plugin: script, config: {phases: [request_headers, request_body, "
         "response_headers, response_body]}}]", ("buffered", "streamed"), False),
        ("processors: [{plugin: script, config: {phases: [request_headers]}}]",
         ("buffered", "buffered"), True),
    ],
    ids=["disabled", "all-needed", "send-body-without-waiting"],
)
async def test_no_override(plugin: ScriptPlugin, policy: str, modes: tuple[str, str], no_wait: bool) -> None:
    stream = await scripted_stream(plugin, policy)
    first = headers_message(POST, modes=modes)
    first.protocol_config.send_body_without_waiting_for_header_response = no_wait
    [answer] = await stream.feed(first)
    assert not answer.HasField("mode_override")


async def test_phases_envoy_sends_anyway_are_answered(plugin: ScriptPlugin) -> None:
    # allowed_override_modes may reject the override: every message must still be answered.
    stream = await scripted_stream(plugin, ONLY_REQUEST_HEADERS)
    answers = await feed_all(
        stream,
        headers_message(POST, modes=("buffered", "buffered")),
        body_message(BODY),
        headers_message({":status": "200"}, response=True),
        body_message(b"{}", response=True),
    )
    assert [which(a[0]) for a in answers] == [
        "request_headers", "request_body", "response_headers", "response_body"
    ]
    assert len(plugin.processed) == 1


# -- errors and timeouts (on_error) ---------------------------------------------------------------


async def test_a_failing_processor_fails_the_stream_with_500_by_default(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, "processors: [{plugin: script, name: broken, config: "
                                   "{phases: [request_headers], fail: true}}]")
    [answer] = await stream.feed(headers_message(POST))
    reply = answer.immediate_response
    assert reply.status.code == 500
    assert reply.details == "extsvc_processor_failed:broken"


async def test_on_error_continue_drops_only_the_failing_processors_changes(plugin: ScriptPlugin) -> None:
    from extsvc.observability.metrics import Metrics
    from extsvc.testing.extproc import stream_for

    from .extproc_kit import script_host

    metrics = Metrics()
    stream = await stream_for("""
extproc:
  default_policy: p
  policies:
    p:
      on_error: continue
      processors:
        - {plugin: script, name: first, config: {phases: [request_headers], set: {x-first: "1"}}}
        - {plugin: script, name: broken, config: {phases: [request_headers], set: {x-broken: "1"},
                                                  remove: [x-first], fail: true}}
        - {plugin: script, name: third, config: {phases: [request_headers], set: {x-third: "1"}}}
""", host=script_host(plugin), metrics=metrics)
    [answer] = await stream.feed(headers_message(POST))
    assert set_headers(common(answer).header_mutation) == [("x-first", b"1", False), ("x-third", b"1", False)]
    assert list(common(answer).header_mutation.remove_headers) == []
    assert plugin.processed[2][2]["x-first"] == "1"  # the third saw the state without the broken one
    assert metrics.registry.get_sample_value(
        "extsvc_extproc_processor_errors_total",
        {"policy": "p", "processor": "broken", "reason": "exception"},
    ) == 1


async def test_an_overrunning_processor_is_answered_per_on_error(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, """
timeout_ms: 20
error_status: 503
processors:
  - {plugin: script, name: slow, config: {phases: [request_headers], sleep_s: 5}}
""")
    [answer] = await stream.feed(headers_message(POST))
    assert answer.immediate_response.status.code == 503
    assert answer.immediate_response.details == "extsvc_processor_failed:slow"


async def test_on_error_continue_after_a_timeout_answers_with_what_was_done(plugin: ScriptPlugin) -> None:
    stream = await scripted_stream(plugin, """
timeout_ms: 20
on_error: continue
processors:
  - {plugin: script, config: {phases: [request_headers], set: {x-a: "1"}}}
  - {plugin: script, name: slow, config: {phases: [request_headers], set: {x-slow: "1"}, sleep_s: 5}}
""")
    [answer] = await stream.feed(headers_message(POST))
    assert set_headers(common(answer).header_mutation) == [("x-a", b"1", False)]


# -- policy selection ------------------------------------------------------------------------------

SELECT = """
extproc:
  default_policy: d
  authority_policies: {gw.internal: a}
  policy_attribute: xds.route_name
  policy_metadata: {namespace: gw.meta, key: extproc}
  policy_header: x-extproc-policy
  policy_header_trusted: true  # the tests play Envoy, which set it
  policies:
    a: {processors: [{plugin: headers, config: {request: {set: {x-policy: a}}}}]}
    b: {processors: [{plugin: headers, config: {request: {set: {x-policy: b}}}}]}
    c: {processors: [{plugin: headers, config: {request: {set: {x-policy: c}}}}]}
    d: {processors: [{plugin: headers, config: {request: {set: {x-policy: d}}}}]}
"""


@pytest.mark.parametrize(
    ("authority", "kwargs", "expected"),
    [
        ("gw.internal", {}, "a"),
        ("b:9001", {}, "b"),
        ("extsvc", {"attributes": {"xds.route_name": "c"}}, "c"),
        ("extsvc", {"metadata": {"gw.meta": {"extproc": "b"}}}, "b"),
        ("extsvc", {"headers": {**POST, "x-extproc-policy": "c"}}, "c"),
        ("extsvc", {}, "d"),
    ],
    ids=["authority-map", "authority-name", "attribute", "metadata", "header", "default"],
)
async def test_policy_selection(authority: str, kwargs: dict[str, object], expected: str) -> None:
    stream = await stream_for(SELECT, authority=authority)
    headers = kwargs.pop("headers", POST)
    [answer] = await stream.feed(headers_message(headers, **kwargs))  # type: ignore[arg-type]
    assert stream.policy_name == expected
    assert set_headers(common(answer).header_mutation) == [("x-policy", expected.encode(), False)]


async def test_an_unknown_policy_fails_closed_with_500() -> None:
    stream = await stream_for(SELECT.replace("default_policy: d", "default_policy: null"), authority="x")
    [answer] = await stream.feed(headers_message({**POST, "x-extproc-policy": "nope"}))
    assert answer.immediate_response.status.code == 500
    assert "unknown ext_proc policy 'nope'" in answer.immediate_response.details
    assert stream.unknown_policy


def test_a_policy_header_is_refused_unless_the_config_says_envoy_sets_it() -> None:
    """A request header is the client's to send: choosing the policy by it is allowed only when
    the config states Envoy strips the client's header and sets its own."""
    untrusted = "extproc: {default_policy: d, policy_header: x-p, policies: {d: {processors: []}}}"
    with pytest.raises(ConfigError) as info:
        parse(untrusted)
    [problem] = info.value.problems
    assert problem.startswith("extproc: policy_header: 'x-p' would let a client choose")
    assert "policy_header_trusted: true" in problem  # the fix, named
    trusted = parse(untrusted.replace("x-p,", "x-p, policy_header_trusted: true,"))
    assert trusted.extproc.policy_header == "x-p"


async def test_a_client_header_cannot_pick_a_policy_without_policy_header() -> None:
    redacting = """
extproc:
  default_policy: redact
  policies:
    redact: {processors: [{plugin: json-redact, config: {request: [password]}}]}
    open: {processors: []}
"""
    stream = await stream_for(redacting, host=PluginHost.create())
    asking = dict.fromkeys(("x-extproc-policy", "x-extsvc-policy", "extsvc-policy"), "open")
    await stream.feed(headers_message({**POST, **asking}, modes=("buffered", "none")))
    assert stream.policy_name == "redact"
    [answer] = await stream.feed(body_message(b'{"user":"ann","password":"hunter2"}'))
    assert b"hunter2" not in answer.request_body.response.body_mutation.body


async def test_no_extproc_section_passes_streams_through_unchanged() -> None:
    stream = await stream_for("policies: {}")
    [answer] = await stream.feed(headers_message(POST))
    assert not answer.HasField("immediate_response") and not stream.unknown_policy
    assert stream.policy_name == "" and not common(answer).HasField("header_mutation")
    # nothing needs the rest of the stream: Envoy is told to skip it where it allows
    assert answer.mode_override.response_header_mode == 2  # SKIP
    [body] = await stream.feed(body_message(b"as it was"))
    assert not body.request_body.response.HasField("body_mutation")


async def test_a_stream_that_chooses_no_policy_passes_through_unless_told_to_reject() -> None:
    config = SELECT.replace("default_policy: d", "default_policy: null")
    passed = await stream_for(config, authority="x")
    [answer] = await passed.feed(headers_message(POST))
    assert not answer.HasField("immediate_response") and passed.policy_name == ""
    rejecting = await stream_for(config + "  unselected: reject\n", authority="x")
    [answer] = await rejecting.feed(headers_message(POST))
    assert answer.immediate_response.status.code == 500
    assert answer.immediate_response.details == "extsvc: no ext_proc policy chosen"
    assert rejecting.unknown_policy


@pytest.mark.parametrize(
    ("config", "matters"),
    [
        (SELECT, True),
        ("extproc: {default_policy: only, policies: {only: {processors: []}}}", False),
        ("extproc: {default_policy: only, authority_policies: {a.example: only},"
         " policies: {only: {processors: []}}}", False),
        ("extproc: {default_policy: only, policy_header: x-p, policy_header_trusted: true,"
         " policies: {only: {processors: []}}}",
         True),  # the header may name an unknown policy: the authority's answer would win
        ("extproc: {policies: {only: {processors: []}}}", True),  # no default: only:9001 -> only
    ],
)
async def test_the_authority_is_read_only_when_it_can_change_the_policy(
    config: str, matters: bool
) -> None:
    """Reading the call's authority (its metadata) per stream is skipped when no authority could
    change which policy is chosen."""
    calls: list[int] = []

    def authority() -> str:
        calls.append(1)
        return "only"

    runtime = await compile_config(parse(config), PluginHost.create(load_entry_points=False), Metrics())
    assert runtime.extproc is not None
    assert runtime.extproc.authority_matters is matters
    stream = ExtprocStream(runtime.extproc, authority=authority)
    await stream.feed(headers_message(POST))
    assert bool(calls) is matters
    if not matters:
        assert stream.policy_name == "only"


HEADERS_ONLY = """
extproc:
  default_policy: p
  policies:
    p: {mode_override: false, processors: [{plugin: headers, config: {request: {set: {x-a: "1"}}}}]}
"""


async def test_phases_no_processor_needs_pass_through_with_the_same_bookkeeping() -> None:
    """Body and trailers messages the policy does not need get the prebuilt CONTINUE at once,
    and still count, end their direction and catch a message after the end."""
    stream = await stream_for(HEADERS_ONLY)
    [first] = await stream.feed(headers_message(POST, modes=("buffered", "none")))
    assert set_headers(common(first).header_mutation) == [("x-a", b"1", False)]
    [chunk] = await stream.feed(body_message(b'{"a": 1}', end_of_stream=False))
    assert which(chunk) == "request_body" and not chunk.request_body.HasField("response")
    [last] = await stream.feed(body_message(b"}", end_of_stream=True))
    assert which(last) == "request_body"
    assert (stream.received, stream.sent) == (3, 3)
    assert stream.exchange.request_done is not None
    with pytest.raises(ProtocolError, match="after that direction ended"):
        await stream.feed(body_message(b"again"))
    [trailers] = await stream.feed(trailers_message({"x-t": "1"}, response=True))
    assert which(trailers) == "response_trailers"
    with pytest.raises(ProtocolError, match="after that direction ended"):
        await stream.feed(trailers_message({"x-t": "2"}, response=True))
