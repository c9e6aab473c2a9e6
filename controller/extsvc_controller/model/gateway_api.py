"""Gateway API objects: Gateway, HTTPRoute, ReferenceGrant."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from .base import GATEWAY_API, Metadata, _Open


class SecretObjectReference(_Open):
    group: str = ""
    kind: str = "Secret"
    name: str
    namespace: str | None = None


class ListenerTLS(_Open):
    mode: Literal["Terminate", "Passthrough"] = "Terminate"
    certificate_refs: list[SecretObjectReference] = Field(default_factory=list)


class RouteNamespaces(_Open):
    from_: Literal["Same", "All", "Selector"] = Field("Same", alias="from")


class AllowedRoutes(_Open):
    namespaces: RouteNamespaces = RouteNamespaces()


class Listener(_Open):
    name: str
    port: int = Field(ge=1, le=65535)
    protocol: Literal["HTTP", "HTTPS"]
    hostname: str | None = None
    tls: ListenerTLS | None = None
    allowed_routes: AllowedRoutes = AllowedRoutes()


class GatewaySpec(_Open):
    gateway_class_name: str = ""
    listeners: list[Listener] = Field(min_length=1)


class Gateway(_Open):
    kind: Literal["Gateway"]
    metadata: Metadata
    spec: GatewaySpec


class ParentReference(_Open):
    group: str = GATEWAY_API
    kind: str = "Gateway"
    namespace: str | None = None
    name: str
    section_name: str | None = None


class PathMatch(_Open):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"


class HeaderMatch(_Open):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str
    value: str


class RouteMatch(_Open):
    path: PathMatch | None = None
    headers: list[HeaderMatch] = Field(default_factory=list)
    query_params: list[HeaderMatch] = Field(default_factory=list)
    method: str | None = None


class HeaderValue(_Open):
    name: str
    value: str


class HeaderModifier(_Open):
    set: list[HeaderValue] = Field(default_factory=list)
    add: list[HeaderValue] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class LocalObjectReference(_Open):
    group: str
    kind: str
    name: str


class RouteFilter(_Open):
    type: str
    request_header_modifier: HeaderModifier | None = None
    extension_ref: LocalObjectReference | None = None


class BackendRef(_Open):
    group: str = ""
    kind: str = "Service"
    name: str
    namespace: str | None = None
    port: int | None = None
    weight: int = Field(1, ge=0, le=1_000_000)
    filters: list[RouteFilter] = Field(default_factory=list)


class _RuleBase(_Open):
    """What HTTPRoute and GRPCRoute rules share (their matches differ)."""

    name: str | None = None
    filters: list[RouteFilter] = Field(default_factory=list)
    backend_refs: list[BackendRef] = Field(default_factory=list)


class RouteRule(_RuleBase):
    matches: list[RouteMatch] = Field(default_factory=lambda: [RouteMatch()])


class _SpecBase(_Open):
    """What HTTPRoute and GRPCRoute specs share (their rules differ)."""

    parent_refs: list[ParentReference] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)


class HTTPRouteSpec(_SpecBase):
    rules: list[RouteRule] = Field(default_factory=lambda: [RouteRule()])


class HTTPRoute(_Open):
    """An HTTPRoute; also the translator's view of a GRPCRoute (:meth:`GRPCRoute.as_route`), whose
    ``kind`` then stays ``GRPCRoute`` for its status and the policies that target it."""

    kind: Literal["HTTPRoute", "GRPCRoute"]
    metadata: Metadata
    spec: HTTPRouteSpec


class GRPCMethodMatch(_Open):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: str | None = Field(None, max_length=1024)
    method: str | None = Field(None, max_length=1024)


class GRPCRouteMatch(_Open):
    method: GRPCMethodMatch | None = None
    headers: list[HeaderMatch] = Field(default_factory=list)


class GRPCRouteRule(_RuleBase):
    matches: list[GRPCRouteMatch] = Field(default_factory=lambda: [GRPCRouteMatch()])


class GRPCRouteSpec(_SpecBase):
    rules: list[GRPCRouteRule] = Field(default_factory=lambda: [GRPCRouteRule()])


class GRPCRoute(_Open):
    """A GRPCRoute: gRPC calls are HTTP/2 requests to ``/<service>/<method>``, so each method
    match becomes a path match and the rest is an HTTPRoute's (Gateway API's GRPCRoute spec)."""

    kind: Literal["GRPCRoute"]
    metadata: Metadata
    spec: GRPCRouteSpec

    def as_route(self) -> HTTPRoute:
        rules = [
            RouteRule(
                name=rule.name,
                matches=[_grpc_match(m) for m in rule.matches],
                filters=rule.filters,
                backend_refs=rule.backend_refs,
            )
            for rule in self.spec.rules
        ]
        return HTTPRoute(
            kind="GRPCRoute",
            metadata=self.metadata,
            spec=HTTPRouteSpec(
                parent_refs=self.spec.parent_refs, hostnames=self.spec.hostnames, rules=rules
            ),
        )


def _grpc_match(match: GRPCRouteMatch) -> RouteMatch:
    method = match.method
    if method is None or (method.service is None and method.method is None):
        path = PathMatch(type="PathPrefix", value="/")
    elif method.type == "RegularExpression":
        path = PathMatch(
            type="RegularExpression", value=f"/{method.service or '[^/]+'}/{method.method or '[^/]+'}"
        )
    elif method.method is None:
        path = PathMatch(type="PathPrefix", value=f"/{method.service}")
    elif method.service is None:
        path = PathMatch(type="RegularExpression", value=f"/[^/]+/{re.escape(method.method)}")
    else:
        path = PathMatch(type="Exact", value=f"/{method.service}/{method.method}")
    return RouteMatch(path=path, headers=match.headers)


class GrantFrom(_Open):
    group: str
    kind: str
    namespace: str


class GrantTo(_Open):
    group: str
    kind: str
    name: str | None = None


class ReferenceGrantSpec(_Open):
    from_: list[GrantFrom] = Field(alias="from", min_length=1)
    to: list[GrantTo] = Field(min_length=1)


class ReferenceGrant(_Open):
    kind: Literal["ReferenceGrant"]
    metadata: Metadata
    spec: ReferenceGrantSpec
