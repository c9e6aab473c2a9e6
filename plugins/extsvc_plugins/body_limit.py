"""``body-limit`` (ext_proc processor): refuse request bodies over N bytes with 413.

A ``content-length`` over the limit is refused on the request headers, before any body is sent;
otherwise the body (BUFFERED) or the running total of its chunks (STREAMED, BUFFERED_PARTIAL,
FULL_DUPLEX_STREAMED) is checked. Configure Envoy's ``request_body_mode`` to something other than
NONE for chunked requests to be checked. Note that Envoy itself answers 413 when a BUFFERED body
exceeds its buffer limit (docs/internals/envoy-behaviour.md §3.3).

Example::

    - plugin: body-limit
      config: {max_bytes: 1048576, status: 413, body: "request body too large\\n"}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extsvc import (
    HeaderName,
    HeaderValue,
    HttpMessage,
    Phase,
    PluginContext,
    Processor,
    ProcessorType,
    hookimpl,
)


class BodyLimitConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(ge=0)
    status: int = Field(413, ge=400, le=599)
    body: str = "request body too large\n"
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)


class BodyLimit(Processor):
    phases = frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})

    def __init__(self, config: BodyLimitConfig, ctx: PluginContext) -> None:
        self._max = config.max_bytes
        self._status = config.status
        self._body = config.body
        self._headers = {"content-type": "text/plain", **config.headers}
        self._refused = ctx.metrics.counter("body_limit_refused", "Requests refused by body-limit")

    def _refuse(self, message: HttpMessage, size: int) -> None:
        self._refused.inc()
        message.respond(
            self._status, self._body, self._headers,
            details=f"extsvc_body_limit:{size}>{self._max}",
        )

    async def on_request_headers(self, message: HttpMessage, /) -> None:
        length = message.headers.get("content-length")
        if length and length.isdigit() and int(length) > self._max:
            self._refuse(message, int(length))

    async def on_request_body(self, message: HttpMessage, /) -> None:
        state = message.exchange.state
        total = state.get(self, 0) + len(message.body)
        state[self] = total
        if total > self._max:
            self._refuse(message, total)


@hookimpl
def extsvc_register_processors() -> Iterator[ProcessorType[Any]]:
    yield ProcessorType(
        name="body-limit",
        config_model=BodyLimitConfig,
        factory=BodyLimit,
        description="refuse request bodies over max_bytes with 413",
    )
