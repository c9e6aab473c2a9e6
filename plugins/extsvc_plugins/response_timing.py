"""``response-timing`` (ext_proc processor): a ``server-timing`` header with the upstream time.

On the response headers it adds ``server-timing: upstream;dur=<ms>`` -- the time from extsvc's
answer to the last request message (the request leaving for the upstream) to the response
headers arriving -- and, with ``total: true``, ``extsvc-total;dur=<ms>`` since the stream opened.
Nothing is added to a local reply that never went upstream.

Example::

    - plugin: response-timing
      config: {header: server-timing, name: upstream, total: true}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extsvc import HeaderName, HttpMessage, Phase, PluginContext, Processor, ProcessorType, hookimpl


class ResponseTimingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    header: HeaderName = "server-timing"
    name: str = Field("upstream", pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    total: bool = False


class ResponseTiming(Processor):
    phases = frozenset({Phase.RESPONSE_HEADERS})

    def __init__(self, config: ResponseTimingConfig, ctx: PluginContext) -> None:
        self._header = config.header
        self._name = config.name
        self._total = config.total

    async def on_response_headers(self, message: HttpMessage, /) -> None:
        exchange = message.exchange
        if exchange.request_done is None:
            return  # a local reply: the request never went upstream
        now = exchange.clock()
        entries = [f"{self._name};dur={(now - exchange.request_done) * 1000:.1f}"]
        if self._total:
            entries.append(f"extsvc-total;dur={(now - exchange.started) * 1000:.1f}")
        message.append_header(self._header, ", ".join(entries))


@hookimpl
def extsvc_register_processors() -> Iterator[ProcessorType[Any]]:
    yield ProcessorType(
        name="response-timing",
        config_model=ResponseTimingConfig,
        factory=ResponseTiming,
        description="server-timing header with the time spent upstream",
    )
