"""``client-cidr``: allow or deny by the client's IP address.

The address is the downstream peer Envoy saw (``source: peer``, the default), or the n-th entry
of ``x-forwarded-for`` counted from the right (``source: x-forwarded-for``, ``xff_hop: 1`` = the
right-most, the one appended by the proxy in front of Envoy).

Spoofing caveat: every ``x-forwarded-for`` entry left of the ones your own proxies append is
written by the client and proves nothing. Count hops only across proxies you control, and make
sure Envoy is reachable only through them; otherwise use ``source: peer``. Envoy with
``use_remote_address: true`` also appends an address of its own (docs/internals/envoy-behaviour.md §1.5).

A ``deny`` match denies (403). With an ``allow`` list, an address outside it is denied, and one
inside it answers ``on_allowed`` (``abstain`` by default, so the step works as a gate in any
combination; set ``allow`` to decide).

Example::

    - plugin: client-cidr
      config:
        allow: [10.0.0.0/8, "fd00::/8"]
        deny: [10.66.0.0/16]
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl


class ClientCidrConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    allow: list[IPvAnyNetwork] = Field(default_factory=list)
    deny: list[IPvAnyNetwork] = Field(default_factory=list)
    source: Literal["peer", "x-forwarded-for"] = "peer"
    xff_hop: int = Field(1, ge=1, le=32)
    on_allowed: Literal["allow", "abstain"] = "abstain"
    status: int = Field(403, ge=400, le=599)
    body: str = ""

    @model_validator(mode="after")
    def _something(self) -> ClientCidrConfig:
        if not self.allow and not self.deny:
            raise ValueError("set allow and/or deny")
        return self


class ClientCidr:
    """A compiled ``client-cidr`` step (see the module docstring)."""

    def __init__(self, config: ClientCidrConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        self._allow = tuple(config.allow)
        self._deny = tuple(config.deny)
        self._allowed = Decision.allow(reason="client-cidr: allowed") if (
            config.on_allowed == "allow"
        ) else None

    def client_address(self, request: CheckContext) -> str | None:
        if self._config.source == "peer":
            return request.source.address or None
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
        if len(hops) < self._config.xff_hop:
            return None
        return hops[-self._config.xff_hop]

    def _refuse(self, request: CheckContext, reason: str) -> Decision:
        self._log.info("client-cidr denied: %s [request_id=%s]", reason, request.request_id)
        return Decision.deny(self._config.status, self._config.body, reason=f"client-cidr: {reason}")

    async def check(self, request: CheckContext, /) -> Decision | None:
        text = self.client_address(request)
        if text is None:
            return self._refuse(request, f"no client address ({self._config.source})")
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return self._refuse(request, f"unparsable address {text[:64]!r}")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self._deny):
            return self._refuse(request, f"{address} is in a deny range")
        if self._allow and not any(address in net for net in self._allow):
            return self._refuse(request, f"{address} is not in an allow range")
        return self._allowed


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="client-cidr",
        config_model=ClientCidrConfig,
        factory=ClientCidr,
        description="allow or deny by client address (peer or an x-forwarded-for hop)",
    )
