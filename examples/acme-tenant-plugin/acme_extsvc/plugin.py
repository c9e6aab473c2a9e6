"""``tenant-header``: abstain for known tenants, deny everyone else.

Use it in a policy::

    steps:
      - plugin: tenant-header
        config: {header: x-tenant, allowed: [acme, globex]}
      - plugin: set-headers
        config: {upstream: {x-tenant-checked: "true"}}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from extsvc import AuthorizerType, CheckContext, Decision, HeaderName, PluginContext, hookimpl


class TenantHeaderConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    header: HeaderName = "x-tenant"
    allowed: frozenset[str]


class TenantHeader:
    def __init__(self, config: TenantHeaderConfig, ctx: PluginContext) -> None:
        self._config = config
        self._unknown = ctx.metrics.counter("unknown_tenants", "Requests from unknown tenants")

    async def check(self, request: CheckContext, /) -> Decision | None:
        if request.headers.get(self._config.header) in self._config.allowed:
            return None  # abstain: let the next step decide
        self._unknown.inc()
        return Decision.deny(status=403, body="unknown tenant\n", reason="unknown tenant")


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="tenant-header",
        config_model=TenantHeaderConfig,
        factory=TenantHeader,
        description="deny requests whose tenant header is not in the allowed set",
    )
