"""``headers`` (ext_proc processor): set, add, remove and rename request and response headers
(and trailers).

Operations on each side run in this order: rename, remove, set, add. ``set`` overwrites (or adds);
``add`` adds another line (``append: true``, docs/internals/envoy-behaviour.md §1.4); ``rename`` moves a
value to a new name (nothing happens when the header is absent). ``:path`` may be set on the
request and ``:status`` on the response; Envoy ignores changes to ``host``, ``:authority``,
``:method``, ``:scheme`` and ``x-envoy-*`` unless its ``mutation_rules`` allow them
(docs/internals/envoy-behaviour.md §3.6).

Example::

    - plugin: headers
      config:
        request:
          set: {x-gateway: extsvc}
          remove: [x-debug]
          rename: {x-user-token: x-upstream-token}
        response:
          set: {x-frame-options: DENY}
          add: {via: extsvc}
          remove: [server]
        response_trailers:
          set: {x-served-by: extsvc}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extsvc import (
    HeaderChanges,
    HeaderName,
    HeaderValue,
    HttpMessage,
    Phase,
    PluginContext,
    Processor,
    ProcessorType,
    hookimpl,
)

_IMMUTABLE = frozenset({"host", ":authority", ":method", ":scheme"})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HeaderOps(_Model):
    set: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    add: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    remove: list[HeaderName] = Field(default_factory=list)
    rename: dict[HeaderName, HeaderName] = Field(default_factory=dict)

    @field_validator("remove")
    @classmethod
    def _removable(cls, names: list[str]) -> list[str]:
        for name in names:
            # docs/internals/envoy-behaviour.md §3.6: Envoy ignores these removals
            if name.startswith(":") or name == "host":
                raise ValueError(f"Envoy cannot remove {name!r} (pseudo-headers and host)")
        return names

    @field_validator("rename")
    @classmethod
    def _renamable(cls, names: dict[str, str]) -> dict[str, str]:
        for old, new in names.items():
            if old.startswith(":") or new.startswith(":") or "host" in (old, new):
                raise ValueError(f"cannot rename {old!r} to {new!r} (pseudo-headers and host)")
        return names

    @field_validator("set", "add")
    @classmethod
    def _settable(cls, values: dict[str, str]) -> dict[str, str]:
        for name in values:
            if name in _IMMUTABLE:
                raise ValueError(f"Envoy ignores changes to {name!r} by default (mutation_rules)")
        return values

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove or self.rename)


class HeadersConfig(_Model):
    request: HeaderOps = Field(default_factory=HeaderOps)
    response: HeaderOps = Field(default_factory=HeaderOps)
    #: trailers: only sent by Envoy with request_trailer_mode / response_trailer_mode SEND and
    #: when the message has trailers (HTTP/2, or HTTP/1.1 chunked with enable_trailers)
    request_trailers: HeaderOps = Field(default_factory=HeaderOps)
    response_trailers: HeaderOps = Field(default_factory=HeaderOps)

    @model_validator(mode="after")
    def _pseudo_sides(self) -> HeadersConfig:
        if ":status" in self.request.set or ":path" in self.response.set:
            raise ValueError(":status belongs to the response and :path to the request")
        for side in ("request_trailers", "response_trailers"):
            ops: HeaderOps = getattr(self, side)
            if any(name.startswith(":") for name in (*ops.set, *ops.add)):
                raise ValueError(f"{side}: trailers have no pseudo-headers")
        return self


def _apply(ops: HeaderOps, message: HttpMessage) -> None:
    for old, new in ops.rename.items():  # reads the headers only when there is a rename
        value = message.headers.get(old)
        if value is not None:
            message.remove_header(old)
            message.set_header(new, value)
    for name in ops.remove:
        message.remove_header(name)
    for name, value in ops.set.items():
        message.set_header(name, value)
    for name, value in ops.add.items():
        message.append_header(name, value)


class Headers(Processor):
    def __init__(self, config: HeadersConfig, ctx: PluginContext) -> None:
        self._request = config.request
        self._response = config.response
        self._request_trailers = config.request_trailers
        self._response_trailers = config.response_trailers
        self.phases = frozenset(
            phase
            for phase, ops in ((Phase.REQUEST_HEADERS, config.request),
                               (Phase.RESPONSE_HEADERS, config.response),
                               (Phase.REQUEST_TRAILERS, config.request_trailers),
                               (Phase.RESPONSE_TRAILERS, config.response_trailers))
            if not ops.empty
        )

    def fixed_headers(self, phase: Phase, /) -> HeaderChanges | None:
        ops = self._request if phase is Phase.REQUEST_HEADERS else self._response
        if ops.rename:  # a rename reads the header's value: it depends on the message
            return None
        return HeaderChanges(set=ops.set, add=ops.add, remove=ops.remove)

    async def on_request_headers(self, message: HttpMessage, /) -> None:
        _apply(self._request, message)

    async def on_response_headers(self, message: HttpMessage, /) -> None:
        _apply(self._response, message)

    async def on_request_trailers(self, message: HttpMessage, /) -> None:
        _apply(self._request_trailers, message)

    async def on_response_trailers(self, message: HttpMessage, /) -> None:
        _apply(self._response_trailers, message)


@hookimpl
def extsvc_register_processors() -> Iterator[ProcessorType[Any]]:
    yield ProcessorType(
        name="headers",
        config_model=HeadersConfig,
        factory=Headers,
        description="set, add, remove and rename request and response headers",
    )
