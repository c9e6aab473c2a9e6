"""The built-in ext_proc processors, through the real stream state machine."""

from __future__ import annotations

import json

import pytest

from extsvc.errors import ConfigError
from extsvc.testing.extproc import body_message, headers_message, stream_for, trailers_message

from .extproc_kit import common, set_headers

POST = {":path": "/", ":method": "POST", "content-type": "application/json", "content-length": "10"}


def config(*processors: str, extra: str = "") -> str:
    lines = "\n".join(f"        - {p}" for p in processors)
    return f"extproc:\n  default_policy: p\n  policies:\n    p:\n{extra}      processors:\n{lines}\n"


async def test_headers_rename_remove_set_add() -> None:
    stream = await stream_for(config(
        "{plugin: headers, config: {request: {rename: {x-old: x-new}, remove: [x-gone], "
        "set: {x-set: s}, add: {x-add: a}}, response: {set: {x-frame-options: DENY}}}}"
    ))
    first = headers_message({**POST, "x-old": "v", "x-gone": "g"}, modes=("none", "none"))
    [answer] = await stream.feed(first)
    mutation = common(answer).header_mutation
    assert set_headers(mutation) == [("x-new", b"v", False), ("x-set", b"s", False), ("x-add", b"a", True)]
    assert list(mutation.remove_headers) == ["x-old", "x-gone"]
    [response] = await stream.feed(headers_message({":status": "200"}, response=True))
    assert set_headers(common(response).header_mutation) == [("x-frame-options", b"DENY", False)]


async def test_headers_changes_trailers_both_ways() -> None:
    stream = await stream_for(config(
        "{plugin: headers, config: {request_trailers: {set: {x-checked: 'yes'}, remove: [x-drop]}, "
        "response_trailers: {add: {x-served-by: extsvc}, rename: {x-old: x-new}}}}"
    ))
    await stream.feed(headers_message({**POST, "x-drop": "header, not trailer"}, modes=("none", "none")))
    [answer] = await stream.feed(trailers_message({"x-drop": "1", "x-client": "c"}))
    mutation = answer.request_trailers.header_mutation
    assert set_headers(mutation) == [("x-checked", b"yes", False)]
    assert list(mutation.remove_headers) == ["x-drop"]
    await stream.feed(headers_message({":status": "200"}, response=True))
    [answer] = await stream.feed(trailers_message({"x-old": "v"}, response=True))
    mutation = answer.response_trailers.header_mutation
    assert set_headers(mutation) == [("x-new", b"v", False), ("x-served-by", b"extsvc", True)]
    assert list(mutation.remove_headers) == ["x-old"]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("{request: {remove: [':path']}}", "cannot remove ':path'"),
        ("{request: {set: {host: x}}}", "ignores changes to 'host'"),
        ("{request: {set: {':status': '201'}}}", ":status belongs to the response"),
        ("{request: {set: {'bad name': x}}}", "invalid header name"),
        ("{response_trailers: {set: {':status': '500'}}}", "trailers have no pseudo-headers"),
    ],
)
async def test_headers_config_is_checked_at_load(block: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        await stream_for(config(f"{{plugin: headers, config: {block}}}"))
    assert "extproc.policies.p.processors[0].config" in str(caught.value.problems)


async def test_request_id_added_only_when_missing() -> None:
    stream = await stream_for(config("{plugin: request-id, config: {response: true}}"))
    [answer] = await stream.feed(headers_message({":path": "/"}, modes=("none", "none")))
    [(name, value, _)] = set_headers(common(answer).header_mutation)
    assert name == "x-request-id" and len(value) == 36
    [response] = await stream.feed(headers_message({":status": "200"}, response=True))
    assert set_headers(common(response).header_mutation) == [("x-request-id", value, False)]
    again = await stream_for(config("{plugin: request-id}"))
    [kept] = await again.feed(headers_message({":path": "/", "x-request-id": "mine"}))
    assert not common(kept).HasField("header_mutation")


@pytest.mark.parametrize(
    ("paths", "action", "expected"),
    [
        (["password"], "mask", {"user": "ann", "password": "***", "cards": [{"number": "1", "exp": "2"}]}),
        (["password"], "drop", {"user": "ann", "cards": [{"number": "1", "exp": "2"}]}),
        (["cards.number"], "mask",
         {"user": "ann", "password": "pw", "cards": [{"number": "***", "exp": "2"}]}),
        (["cards.*.exp"], "drop", {"user": "ann", "password": "pw", "cards": [{"number": "1"}]}),
        (["cards.0"], "drop", {"user": "ann", "password": "pw", "cards": []}),
        (["*"], "mask", {"user": "***", "password": "***", "cards": "***"}),
        (["nothing.here"], "mask", None),
    ],
)
async def test_json_redact_paths(paths: list[str], action: str, expected: object) -> None:
    doc = {"user": "ann", "password": "pw", "cards": [{"number": "1", "exp": "2"}]}
    stream = await stream_for(config(
        f"{{plugin: json-redact, config: {{request: {json.dumps(paths)}, action: {action}}}}}"
    ))
    body = json.dumps(doc).encode()
    await stream.feed(headers_message({**POST, "content-length": str(len(body))}, modes=("buffered", "none")))
    [answer] = await stream.feed(body_message(body))
    response = common(answer)
    if expected is None:
        assert not response.HasField("body_mutation")
        return
    new = response.body_mutation.body
    assert json.loads(new) == expected
    assert ("content-length", str(len(new)).encode(), False) in set_headers(response.header_mutation)


async def test_json_redact_leaves_other_content_types_and_bad_json_alone() -> None:
    stream = await stream_for(config("{plugin: json-redact, config: {request: [a]}}"))
    await stream.feed(headers_message({**POST, "content-type": "text/plain"}, modes=("buffered", "none")))
    [answer] = await stream.feed(body_message(b'{"a": 1}'))
    assert not common(answer).HasField("body_mutation")
    stream = await stream_for(config("{plugin: json-redact, config: {request: [a]}}"))
    await stream.feed(headers_message(POST, modes=("buffered", "none")))
    [answer] = await stream.feed(body_message(b'{"a": '))
    assert not common(answer).HasField("body_mutation")


async def test_json_redact_collects_streamed_chunks() -> None:
    stream = await stream_for(config("{plugin: json-redact, config: {request: [a]}}"))
    await stream.feed(headers_message(POST, modes=("streamed", "none")))
    [first] = await stream.feed(body_message(b'{"a": "se', end_of_stream=False))
    [last] = await stream.feed(body_message(b'cret", "b": 1}', end_of_stream=True))
    assert common(first).body_mutation.body == b""
    assert json.loads(common(last).body_mutation.body) == {"a": "***", "b": 1}


async def test_json_redact_response_only_declares_response_body_and_reads_its_headers() -> None:
    stream = await stream_for(config("{plugin: json-redact, config: {response: [token]}}"))
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "buffered")))
    mode = answer.mode_override
    assert (mode.request_body_mode, mode.response_body_mode, mode.response_header_mode) == (0, 2, 0)


async def test_body_limit_on_content_length_and_on_chunks() -> None:
    stream = await stream_for(config("{plugin: body-limit, config: {max_bytes: 5}}"))
    [answer] = await stream.feed(headers_message(POST, modes=("buffered", "none")))
    assert answer.immediate_response.status.code == 413
    assert answer.immediate_response.body == b"request body too large\n"
    stream = await stream_for(config("{plugin: body-limit, config: {max_bytes: 5, status: 400}}"))
    await stream.feed(headers_message({":path": "/"}, modes=("streamed", "none")))
    [ok] = await stream.feed(body_message(b"abc", end_of_stream=False))
    [over] = await stream.feed(body_message(b"def", end_of_stream=False))
    assert which_oneof(ok) == "request_body"
    assert over.immediate_response.status.code == 400


def which_oneof(response: object) -> str:
    return str(response.WhichOneof("response"))  # type: ignore[attr-defined]


async def test_response_timing_with_a_fake_clock() -> None:
    now = [100.0]
    timing = config("{plugin: response-timing, config: {total: true}}")
    stream = await stream_for(timing, clock=lambda: now[0])
    await stream.feed(headers_message({":path": "/"}, end_of_stream=True, modes=("none", "none")))
    now[0] = 100.0425
    [answer] = await stream.feed(headers_message({":status": "200"}, response=True))
    assert set_headers(common(answer).header_mutation) == [
        ("server-timing", b"upstream;dur=42.5, extsvc-total;dur=42.5", True)
    ]


async def test_response_timing_skips_local_replies() -> None:
    stream = await stream_for(config("{plugin: response-timing}"))
    [answer] = await stream.feed(headers_message({":status": "403"}, response=True, modes=("none", "none")))
    assert not common(answer).HasField("header_mutation")
