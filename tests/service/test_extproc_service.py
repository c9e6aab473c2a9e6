"""ext_proc over a real gRPC stream to the in-process server: the adapter around the state machine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extsvc.testing import running_server
from extsvc.testing.extproc import DEFAULT_REQUEST_HEADERS, body_message, headers_message

CONFIG = """
version: 1
extproc:
  default_policy: web
  policies:
    web:
      processors:
        - plugin: headers
          config:
            request: {set: {x-gateway: extsvc}}
            response: {set: {x-frame-options: DENY}}
"""


async def exchange(port: int, messages: Sequence[Any]) -> list[Any]:
    """Send ``messages`` on one Process stream, half-close, and collect every answer."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)

        async def requests() -> AsyncIterator[Any]:
            for message in messages:
                yield message

        return [answer async for answer in stub.Process(requests(), timeout=5)]


def raw_headers(mutation: Any) -> dict[str, bytes]:
    return {option.header.key: option.header.raw_value for option in mutation.set_headers}


async def test_a_stream_is_answered_phase_by_phase_with_raw_value_mutations() -> None:
    async with running_server(CONFIG) as server:
        answers = await exchange(server.grpc_port, [
            headers_message(end_of_stream=True, modes=("none", "none")),
            headers_message(response=True),
        ])
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "response_headers"]
    request_mutation = answers[0].request_headers.response.header_mutation
    assert raw_headers(request_mutation) == {"x-gateway": b"extsvc"}
    # docs/internals/envoy-behaviour.md §1.3: Envoy reads only raw_value; `value` must stay empty.
    assert all(o.header.value == "" for o in request_mutation.set_headers)
    assert raw_headers(answers[1].response_headers.response.header_mutation) == {
        "x-frame-options": b"DENY"
    }


async def test_a_stream_may_begin_with_response_headers() -> None:
    """A local reply from an earlier filter (an ext_authz 403) reaches ext_proc without request phases."""
    async with running_server(CONFIG) as server:
        answers = await exchange(server.grpc_port, [headers_message(response=True)])
    assert [a.WhichOneof("response") for a in answers] == ["response_headers"]


async def test_a_phase_out_of_order_ends_the_stream_with_invalid_argument() -> None:
    async with running_server(CONFIG) as server:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await exchange(server.grpc_port, [
                headers_message(end_of_stream=True, modes=("none", "none")),
                headers_message(end_of_stream=True),            # request headers twice
            ])
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_before_the_first_config_a_stream_ends_with_unavailable(tmp_path: Path) -> None:
    broken = tmp_path / "config.yaml"
    broken.write_text("extproc: {policies: {web: {processors: [{plugin: no-such-processor}]}}}\n")
    async with running_server(broken) as server:
        assert not server.health.ready
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await exchange(server.grpc_port, [headers_message(modes=("none", "none"))])
    # Envoy treats a failed stream per failure_mode_allow / status_on_error: never a silent allow.
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_buffered_body_that_changes_length_carries_content_length() -> None:
    config = """
version: 1
extproc:
  default_policy: redact
  policies:
    redact:
      processors:
        - plugin: json-redact
          config: {request: [password]}
"""
    body = b'{"user": "ann", "password": "hunter2"}'
    async with running_server(config) as server:
        answers = await exchange(server.grpc_port, [
            headers_message(
                {**DEFAULT_REQUEST_HEADERS, "content-length": str(len(body))},
                modes=("buffered", "none"),
            ),
            body_message(body),
        ])
    kinds = [a.WhichOneof("response") for a in answers]
    assert kinds[:2] == ["request_headers", "request_body"]
    common = answers[1].request_body.response
    new_body = common.body_mutation.body
    assert b"hunter2" not in new_body
    # Envoy keeps content-length in BUFFERED mode with headers sent, and rejects a body whose
    # length no longer matches it: the same answer must fix content-length.
    # docs/internals/envoy-behaviour.md §3.3.
    assert raw_headers(common.header_mutation)["content-length"] == str(len(new_body)).encode()
