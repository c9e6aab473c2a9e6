"""Builders for ext_proc tests: the ``ProcessingRequest``s Envoy 1.40 sends.

See docs/internals/envoy-behaviour.md §3.1 and §3.2.

Feed them to a stream state machine, or send them over a real gRPC stream::

    from extsvc.testing.extproc import headers_message, body_message, stream_for

    stream = await stream_for("extproc: {default_policy: p, policies: {p: {processors: ...}}}")
    [answer] = await stream.feed(headers_message({":path": "/", "x-a": "1"}, modes=("buffered", "none")))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extsvc.extproc.stream import ExtprocStream
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse

__all__ = [
    "DEFAULT_REQUEST_HEADERS",
    "body_message",
    "header_map",
    "headers_message",
    "stream_for",
    "trailers_message",
]

_MODES = {
    "none": processing_mode_pb2.ProcessingMode.NONE,
    "streamed": processing_mode_pb2.ProcessingMode.STREAMED,
    "buffered": processing_mode_pb2.ProcessingMode.BUFFERED,
    "buffered_partial": processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL,
    "full_duplex_streamed": processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
}

DEFAULT_REQUEST_HEADERS: Mapping[str, str] = {
    ":authority": "127.0.0.1:10000",
    ":path": "/orders?id=7",
    ":method": "POST",
    ":scheme": "http",
    "content-type": "application/json",
    "x-request-id": "c8e1e76a-f2e7-4b51-ae50-fe9b405ef1b4",
}


def header_map(headers: Mapping[str, str] | list[tuple[str, str]]) -> Any:
    """A ``HeaderMap`` with ``raw_value`` entries, as Envoy sends them.

    See docs/internals/envoy-behaviour.md §1.3.
    """
    out = pb.HttpHeaders().headers
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        out.headers.add(key=key, raw_value=value.encode())
    return out


def headers_message(
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    *,
    response: bool = False,
    end_of_stream: bool = False,
    modes: tuple[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    observability: bool = False,
) -> Any:
    """A ``request_headers`` (or ``response_headers``) message.

    :param modes: (request_body_mode, response_body_mode) -> ``protocol_config``, which Envoy
        puts on the first message of a stream only.
    :param attributes: values under ``attributes["envoy.filters.http.ext_proc"]``.
    """
    if headers is None:
        headers = {":status": "200"} if response else dict(DEFAULT_REQUEST_HEADERS)
    request = pb.ProcessingRequest(observability_mode=observability)
    inner = request.response_headers if response else request.request_headers
    inner.headers.CopyFrom(header_map(headers))
    inner.end_of_stream = end_of_stream
    if modes is not None:
        request.protocol_config.request_body_mode = _MODES[modes[0]]
        request.protocol_config.response_body_mode = _MODES[modes[1]]
    if attributes:
        request.attributes["envoy.filters.http.ext_proc"].update(dict(attributes))
    for namespace, fields in (metadata or {}).items():
        request.metadata_context.filter_metadata[namespace].update(dict(fields))
    return request


def body_message(
    body: bytes,
    *,
    response: bool = False,
    end_of_stream: bool = True,
    modes: tuple[str, str] | None = None,
    observability: bool = False,
) -> Any:
    """A ``request_body`` (or ``response_body``) message."""
    request = pb.ProcessingRequest(observability_mode=observability)
    inner = request.response_body if response else request.request_body
    inner.body = body
    inner.end_of_stream = end_of_stream
    if modes is not None:
        request.protocol_config.request_body_mode = _MODES[modes[0]]
        request.protocol_config.response_body_mode = _MODES[modes[1]]
    return request


def trailers_message(trailers: Mapping[str, str], *, response: bool = False) -> Any:
    """A ``request_trailers`` (or ``response_trailers``) message."""
    request = pb.ProcessingRequest()
    inner = request.response_trailers if response else request.request_trailers
    inner.trailers.CopyFrom(header_map(trailers))
    return request


async def stream_for(
    config: str,
    *,
    host: PluginHost | None = None,
    authority: str = "extsvc",
    clock: Callable[[], float] = time.monotonic,
    metrics: Metrics | None = None,
) -> ExtprocStream:
    """A fresh stream state machine over the ``extproc:`` policies of a YAML config."""
    runtime = await compile_config(
        parse(config), host or PluginHost.create(load_entry_points=False), metrics or Metrics()
    )
    return ExtprocStream(runtime.extproc, authority=lambda: authority, clock=clock)
