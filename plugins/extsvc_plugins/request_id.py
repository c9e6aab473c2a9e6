"""``request-id`` (ext_proc processor): give every request an id when it has none.

Adds ``x-request-id`` (or the configured header) with a random UUID4 when the request lacks it;
with ``response: true`` the id is also returned to the client on the response.

Example::

    - plugin: request-id
      config: {header: x-request-id, response: true}
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from extsvc import HeaderName, HttpMessage, Phase, PluginContext, Processor, ProcessorType, hookimpl


class RequestIdConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    header: HeaderName = "x-request-id"
    response: bool = False


class RequestId(Processor):
    def __init__(self, config: RequestIdConfig, ctx: PluginContext) -> None:
        self._header = config.header
        self._response = config.response
        phases = {Phase.REQUEST_HEADERS}
        if config.response:
            phases.add(Phase.RESPONSE_HEADERS)
        self.phases = frozenset(phases)

    async def on_request_headers(self, message: HttpMessage, /) -> None:
        if not message.headers.get(self._header):
            message.set_header(self._header, str(uuid.uuid4()))

    async def on_response_headers(self, message: HttpMessage, /) -> None:
        value = message.exchange.request_headers.get(self._header)
        if value and self._header not in message.headers:
            message.set_header(self._header, value)


@hookimpl
def extsvc_register_processors() -> Iterator[ProcessorType[Any]]:
    yield ProcessorType(
        name="request-id",
        config_model=RequestIdConfig,
        factory=RequestId,
        description="add x-request-id (UUID4) to requests that have none",
    )
