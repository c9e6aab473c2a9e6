"""``set-headers``: allow, changing the request on its way upstream and the response back.

Put it last in a ``first-decisive`` policy (earlier steps abstain or deny), or anywhere in an
``all-must-allow`` policy, whose allows are merged.

Example::

    - plugin: set-headers
      config:
        upstream: {x-authz: ok}              # overwrite or add
        append_upstream: {x-trace: authz}    # comma-append, only if the header exists
        remove_upstream: [authorization]     # the backend never sees the credential
        response:
          - {name: x-frame-options, value: DENY, action: overwrite}
        query_set: {source: gateway}
        query_remove: [debug]
        metadata: {tier: gold}               # dynamic metadata for later filters
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extsvc import (
    AuthorizerType,
    CheckContext,
    Decision,
    HeaderName,
    HeaderValue,
    PluginContext,
    ResponseHeader,
    ResponseHeaderAction,
    hookimpl,
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ResponseHeaderConfig(_Model):
    name: HeaderName
    value: HeaderValue
    action: ResponseHeaderAction = ResponseHeaderAction.APPEND


class SetHeadersConfig(_Model):
    upstream: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    append_upstream: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    remove_upstream: list[HeaderName] = Field(default_factory=list)
    response: list[ResponseHeaderConfig] = Field(default_factory=list)
    query_set: dict[str, str] = Field(default_factory=dict)
    query_remove: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("remove_upstream")
    @classmethod
    def _no_pseudo(cls, names: list[str]) -> list[str]:
        # docs/internals/envoy-behaviour.md §2.3: Envoy silently ignores removing :-headers and host.
        for name in names:
            if name.startswith(":") or name == "host":
                raise ValueError(f"Envoy cannot remove {name!r} (pseudo-headers and host)")
        return names

    @field_validator("metadata")
    @classmethod
    def _no_envoy_key(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        # docs/internals/envoy-behaviour.md §2.4: Envoy writes this key itself
        if "ext_authz_duration" in metadata:
            raise ValueError("ext_authz_duration is reserved by Envoy")
        return metadata


class SetHeaders:
    def __init__(self, config: SetHeadersConfig, ctx: PluginContext) -> None:
        self._decision = Decision.allow(
            upstream_set=config.upstream,
            upstream_append=config.append_upstream,
            upstream_remove=config.remove_upstream,
            response_headers=[ResponseHeader(h.name, h.value, h.action) for h in config.response],
            query_set=config.query_set,
            query_remove=config.query_remove,
            metadata=config.metadata,
            reason=f"{ctx.step}: allow with mutations",
        )

    async def check(self, request: CheckContext, /) -> Decision | None:
        return self._decision


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="set-headers",
        config_model=SetHeadersConfig,
        factory=SetHeaders,
        description="allow and set/append/remove upstream headers, response headers, "
        "query parameters and dynamic metadata",
    )
