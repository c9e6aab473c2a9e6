"""ext_proc through a real Envoy 1.40: every body mode, every built-in processor, mode_override."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port, wait_until

from .conftest import HERE, StartEnvoy
from .rawhttp import raw_exchange

ENVOY_CONFIG = HERE / "envoy-extproc.yaml"
STATS = "http.ingress_http.ext_proc."


@pytest.fixture(scope="module")
def extsvc_proc() -> Iterator[ExtsvcProcess]:
    """``extsvc serve`` with tests/e2e/extproc-policies.yaml (ext_authz + ext_proc policies)."""
    with ExtsvcProcess(HERE / "extproc-policies.yaml") as server:
        yield server


@pytest.fixture(scope="module")
def envoy(start_envoy: StartEnvoy, extsvc_proc: ExtsvcProcess) -> EnvoyProcess:
    return start_envoy(ENVOY_CONFIG, extsvc_proc.grpc_port)


def policy(name: str, **headers: str) -> dict[str, str]:
    return {"x-extproc-policy": name, **headers}


def echoed(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, (response.status_code, response.text)
    data: dict[str, object] = json.loads(response.content)
    return data


def last_request_headers(backend: EchoBackend) -> dict[str, str]:
    return backend.requests[-1].headers


# -- headers ------------------------------------------------------------------------------------


def test_headers_processor_changes_request_and_response(envoy: EnvoyProcess, backend: EchoBackend) -> None:
    response = httpx.post(
        envoy.url("/orders"), json={"item": "book"},
        headers={"x-secret": "s3", "x-old": "moved", "x-trace": "client"},
    )
    seen = last_request_headers(backend)
    assert seen["x-extproc"] == "on"
    assert "x-secret" not in seen
    assert (seen.get("x-new"), "x-old" in seen) == ("moved", False)
    assert seen["x-trace"] == "client,extsvc"   # a second line (append: true), joined by the echo
    assert response.status_code == 200
    assert response.headers["x-frame-options"] == "DENY"
    assert sorted(response.headers.get_list("x-backend")) == ["echo", "extproc"]


def test_a_local_reply_from_ext_authz_reaches_ext_proc_as_response_headers(
    envoy: EnvoyProcess, extsvc_proc: ExtsvcProcess
) -> None:
    # The stream begins with response_headers: the request never went upstream.
    def reset_streams() -> float:
        # Envoy ends such a stream right after the one answer, by half-close or by reset: ok.
        return extsvc_proc.metric("extsvc_extproc_streams_total", policy="headers", outcome="ok")

    before = reset_streams()
    response = httpx.get(envoy.url("/deny"))
    assert response.status_code == 403
    assert response.text == "denied by ext_authz\n"
    assert response.headers["x-frame-options"] == "DENY"
    assert "x-extproc" not in response.headers
    wait_until(lambda: reset_streams() >= before + 1, 5, "the stream to be counted")


# -- request-id and policy choice by :authority ----------------------------------------------------


def test_request_id_added_when_missing_and_returned(envoy: EnvoyProcess, backend: EchoBackend) -> None:
    response = httpx.get(envoy.url("/"), headers=policy("request-id"))
    sent = last_request_headers(backend)["x-correlation-id"]
    assert uuid.UUID(sent).version == 4
    assert response.headers["x-correlation-id"] == sent
    kept = httpx.get(envoy.url("/"), headers=policy("request-id", **{"x-correlation-id": "mine"}))
    assert last_request_headers(backend)["x-correlation-id"] == "mine"
    assert kept.headers["x-correlation-id"] == "mine"


def test_policy_chosen_by_the_calls_authority(envoy: EnvoyProcess, backend: EchoBackend) -> None:
    # /by-authority sends `x-extsvc-authority: request-id` as gRPC initial metadata.
    httpx.get(envoy.url("/by-authority"))
    seen = last_request_headers(backend)
    assert "x-correlation-id" in seen and "x-extproc" not in seen


def test_unknown_policy_fails_closed(envoy: EnvoyProcess, extsvc_proc: ExtsvcProcess) -> None:
    response = httpx.get(envoy.url("/"), headers=policy("no-such-policy"))
    assert response.status_code == 500
    wait_until(
        lambda: extsvc_proc.metric(
            "extsvc_extproc_streams_total", policy="(unknown)", outcome="unknown-policy"
        ) >= 1,
        5, "the stream to be counted",
    )
    assert "unknown policy 'no-such-policy'" in extsvc_proc.log()


# -- json-redact in every body mode -----------------------------------------------------------------

SECRET_DOC = {"user": "ann", "password": "pw", "cards": [{"number": "4111111111111111", "exp": "12/30"}]}


@pytest.mark.parametrize(
    ("path", "mode"),
    [("/orders", "BUFFERED"), ("/streamed/orders", "STREAMED"), ("/partial/orders", "BUFFERED_PARTIAL"),
     ("/duplex/orders", "FULL_DUPLEX_STREAMED")],
    ids=["buffered", "streamed", "buffered-partial", "full-duplex"],
)
def test_json_redact_in_each_body_mode(
    envoy: EnvoyProcess, backend: EchoBackend, path: str, mode: str
) -> None:
    body = json.dumps(SECRET_DOC).encode()

    def chunks() -> Iterator[bytes]:  # a chunked upload, so streamed modes see several chunks
        yield body[:20]
        yield body[20:]

    content = chunks() if mode != "BUFFERED" else body
    response = httpx.post(
        envoy.url(path), content=content,
        headers=policy("redact", **{"content-type": "application/json", "authorization": "Bearer t0p",
                                    "x-echo-chunks": "3"}),
    )
    received = backend.requests[-1]
    assert json.loads(received.body) == {
        "user": "ann", "password": "***", "cards": [{"number": "***", "exp": "12/30"}]
    }
    if "content-length" in received.headers:  # BUFFERED: fixed by extsvc in the same answer
        assert int(received.headers["content-length"]) == len(received.body)
    seen = echoed(response)  # the response body was redacted too (headers.authorization)
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == "***"
    assert headers["x-extproc-policy"] == "redact"


def test_non_json_bodies_pass_unchanged(envoy: EnvoyProcess, backend: EchoBackend) -> None:
    headers = policy("redact", **{"content-type": "text/plain"})
    httpx.post(envoy.url("/"), content=b"password=pw", headers=headers)
    assert backend.requests[-1].body == b"password=pw"


# -- body-limit -------------------------------------------------------------------------------------


def test_body_limit_refuses_on_content_length_before_the_body(
    envoy: EnvoyProcess, backend: EchoBackend
) -> None:
    before = len(backend.requests)
    response = httpx.post(envoy.url("/"), content=b"x" * 17, headers=policy("limit"))
    assert response.status_code == 413
    assert response.text == "request body too large\n"
    assert len(backend.requests) == before
    assert httpx.post(envoy.url("/"), content=b"x" * 16, headers=policy("limit")).status_code == 200


def test_body_limit_counts_streamed_chunks(envoy: EnvoyProcess) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * 6

    response = httpx.post(envoy.url("/streamed/upload"), content=chunks(), headers=policy("limit"))
    assert response.status_code == 413


# -- response-timing --------------------------------------------------------------------------------


def test_response_timing_reports_upstream_time(envoy: EnvoyProcess) -> None:
    response = httpx.get(envoy.url("/"), headers=policy("timing"))
    assert response.status_code == 200
    assert re.fullmatch(
        r"upstream;dur=\d+\.\d, extsvc-total;dur=\d+\.\d", response.headers["server-timing"]
    ), response.headers["server-timing"]


def test_all_built_ins_in_one_policy(envoy: EnvoyProcess, backend: EchoBackend) -> None:
    response = httpx.post(
        envoy.url("/orders"), json={"user": "ann", "password": "pw"}, headers=policy("everything")
    )
    received = backend.requests[-1]
    assert json.loads(received.body) == {"user": "ann", "password": "***"}
    assert int(received.headers["content-length"]) == len(received.body)
    assert received.headers["x-extproc"] == "on" and received.headers["x-request-id"]
    assert response.headers["x-done"] == "1" and "upstream;dur=" in response.headers["server-timing"]


# -- mode_override: fewer messages ------------------------------------------------------------------


def _messages_for_one_post(envoy: EnvoyProcess, name: str) -> int:
    before = envoy.stats(STATS).get(STATS + "stream_msgs_sent", 0)
    response = httpx.post(envoy.url("/orders"), json={"a": 1}, headers=policy(name))
    assert response.status_code == 200
    return envoy.stats(STATS)[STATS + "stream_msgs_sent"] - before


def test_mode_override_skips_the_phases_no_processor_needs(
    envoy: EnvoyProcess, extsvc_proc: ExtsvcProcess, backend: EchoBackend
) -> None:
    # Envoy is configured to send headers and BUFFERED bodies both ways: 4 messages per POST.
    assert _messages_for_one_post(envoy, "request-headers-no-override") == 4
    # The policy only needs request headers: the answer to them switches the other three off.
    assert _messages_for_one_post(envoy, "request-headers-only") == 1
    assert last_request_headers(backend)["x-extproc"] == "req-only"
    wait_until(
        lambda: extsvc_proc.metric("extsvc_extproc_mode_overrides_total", policy="request-headers-only")
        >= 1,
        5, "the override to be counted",
    )
    # Envoy ends these streams by half-close or by reset; either way the stream did its work
    streams = extsvc_proc.metric("extsvc_extproc_streams_total", policy="request-headers-only", outcome="ok")
    received = extsvc_proc.metric(
        "extsvc_extproc_messages_total", policy="request-headers-only", direction="received"
    )
    assert received == streams == 1  # one message in one stream


def test_disabled_route_opens_no_stream(envoy: EnvoyProcess) -> None:
    before = envoy.stats(STATS).get(STATS + "streams_started", 0)
    assert httpx.get(envoy.url("/healthz")).status_code == 200
    assert envoy.stats(STATS).get(STATS + "streams_started", 0) == before


def test_server_down_fails_closed(start_envoy: StartEnvoy) -> None:
    envoy = start_envoy(ENVOY_CONFIG, free_port())  # nothing listens there
    # ext_authz fails first (a 403 local reply, its default status_on_error); that reply then
    # goes through ext_proc, which cannot reach extsvc either: fail-closed 500.
    assert httpx.get(envoy.url("/")).status_code == 500
    stats = envoy.stats(STATS)
    assert stats[STATS + "streams_failed"] >= 1


# -- trailers and observability mode ------------------------------------------------------------


def test_trailers_are_processed_both_ways(
    envoy: EnvoyProcess, backend: EchoBackend, extsvc_proc: ExtsvcProcess
) -> None:
    body = b'{"item": "book"}'
    request = (
        b"POST /trailers HTTP/1.1\r\nhost: e2e\r\nx-extproc-policy: trailers\r\n"
        b"x-echo-trailers: x-up=1\r\nte: trailers\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(body), body)
        + b"0\r\nx-client: c\r\nx-drop: d\r\n\r\n"
    )
    reply = raw_exchange(envoy.port, request)
    trailers = reply.trailers
    assert reply.status == 200
    seen = backend.requests[-1]
    assert seen.body == body
    assert seen.trailers.get("x-client") == "c"
    assert seen.trailers.get("x-checked") == "yes"   # added by the request_trailers answer
    assert "x-drop" not in seen.trailers             # removed by it
    assert trailers.get("x-up") == "1"               # the backend's own trailer
    assert trailers.get("x-served-by") == "extsvc"   # added by the response_trailers answer
    # The policy needs no response headers: its first answer carried a mode_override (SKIP them),
    # which must keep the trailers coming (Envoy drops them on an override saying DEFAULT).
    wait_until(  # counted when the stream ends, which may be after the client has its reply
        lambda: extsvc_proc.metric("extsvc_extproc_mode_overrides_total", policy="trailers") >= 1,
        5, "the override to be counted",
    )


def test_observability_mode_is_answered_with_silence(
    envoy: EnvoyProcess, extsvc_proc: ExtsvcProcess, backend: EchoBackend
) -> None:
    def messages(direction: str) -> float:
        return extsvc_proc.metric("extsvc_extproc_messages_total", policy="headers", direction=direction)

    received, sent = messages("received"), messages("sent")
    observe = "http.ingress_http.ext_proc.observe."
    response = httpx.post(envoy.url("/observe/orders"), content=b"hello", headers={"x-secret": "kept"})
    assert response.status_code == 200
    seen = last_request_headers(backend)
    assert "x-extproc" not in seen and seen["x-secret"] == "kept"  # nothing applied
    # extsvc got request headers, the body and the response headers, and ran the policy on them...
    wait_until(lambda: messages("received") >= received + 3, 10, "the observed stream to end")
    # ... but sent nothing back: Envoy received no message on that stream, spurious or not.
    assert messages("sent") == sent
    stats = envoy.stats(observe)
    assert stats[observe + "streams_started"] >= 1
    assert stats.get(observe + "stream_msgs_sent", 0) >= 3
    assert stats.get(observe + "stream_msgs_received", 0) == 0
    assert stats.get(observe + "spurious_msgs_received", 0) == 0
