"""Gateway API objects: Gateway, HTTPRoute, ReferenceGrant."""

from __future__ import annotations

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


class RouteRule(_Open):
    name: str | None = None
    matches: list[RouteMatch] = Field(default_factory=lambda: [RouteMatch()])
    filters: list[RouteFilter] = Field(default_factory=list)
    backend_refs: list[BackendRef] = Field(default_factory=list)


class HTTPRouteSpec(_Open):
    parent_refs: list[ParentReference] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: list[RouteRule] = Field(default_factory=lambda: [RouteRule()])


class HTTPRoute(_Open):
    kind: Literal["HTTPRoute"]
    metadata: Metadata
    spec: HTTPRouteSpec


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
