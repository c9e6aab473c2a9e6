"""Typed views of the Kubernetes objects the controller reads.

Gateway API (``Gateway``, ``HTTPRoute``, ``ReferenceGrant``), core (``Service``, ``Secret``) and
kgateway's ``GatewayExtension`` / ``TrafficPolicy`` (docs/internals/kgateway-translation.md §1, §2). The CRDs'
CEL rules are checked here with the CRDs' own messages, so a manifest the API server would refuse
is refused here with the same words.

Parsing never raises for a bad object: :func:`parse_object` returns the object (or None) and the
list of problems, and the translator reports them in the object's status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from . import crd
from .crd import Problem, at_least, exactly_one, format_errors, get, parse_duration

__all__ = [
    "GATEWAY_API",
    "KGATEWAY",
    "Gateway",
    "GatewayExtension",
    "HTTPRoute",
    "Object",
    "ReferenceGrant",
    "Secret",
    "Service",
    "TrafficPolicy",
    "parse_duration",
    "parse_object",
]

GATEWAY_API = "gateway.networking.k8s.io"
KGATEWAY = "gateway.kgateway.dev"

_1MS = timedelta(milliseconds=1)
_TIMEOUT_1MS = "timeout must be at least 1ms."


class _M(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused, immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class _Checked(_M):
    """A kgateway type with CEL rules (:mod:`.crd`): every failing rule is reported, also when
    other fields fail their schema. Subclasses give the rules in :meth:`_rules`."""

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _crd_rules(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        return crd.validate(cls._rules, data, handler, cls.__name__)


class _Open(_M):
    """For standard Kubernetes types: fields this controller does not use are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True)


class Metadata(_Open):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: str | None = None


# --- core -----------------------------------------------------------------------------------------


class ServicePort(_Open):
    name: str | None = None
    port: int
    protocol: str = "TCP"
    app_protocol: str | None = None


class ServiceSpec(_Open):
    ports: list[ServicePort] = Field(default_factory=list)


class Service(_Open):
    kind: Literal["Service"]
    metadata: Metadata
    spec: ServiceSpec = ServiceSpec()


class Secret(_Open):
    kind: Literal["Secret"]
    metadata: Metadata
    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict)


# --- Gateway API ----------------------------------------------------------------------------------


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


# --- kgateway GatewayExtension (docs/internals/kgateway-translation.md §1.1) -------------------------

Duration = Annotated[str, Field(max_length=32)]


class ExtBackendRef(_Checked):
    group: str = ""
    kind: str = "Service"
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    weight: int = Field(1, ge=0, le=1_000_000)

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        service = get(data, "group", "") == "" and get(data, "kind", "Service") == "Service"
        return [("", "Must have port for Service reference")] if service and get(data, "port") is None else []


class RetryBackoff(_Checked):
    base_interval: Duration
    max_interval: Duration | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        base = crd.duration(data, "base_interval", problems)
        if base is not None and base < _1MS:
            problems.append(("baseInterval", "retry.BaseInterval must be at least 1ms."))
        longest = crd.duration(data, "max_interval", problems)
        if base is not None and longest is not None and longest < base:
            problems.append(("", "maxInterval must be greater than or equal to baseInterval"))
        return problems


class ExtSvcRetry(_M):
    attempts: int = Field(1, ge=0)
    backoff: RetryBackoff | None = None


class ExtGrpcService(_Checked):
    backend_ref: ExtBackendRef
    authority: str | None = None
    request_timeout: Duration | None = None
    retry: ExtSvcRetry | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        at_least(data, "request_timeout", _1MS, _TIMEOUT_1MS, problems)
        return problems


class AuthorizationRequest(_M):
    headers_to_add: dict[str, str] = Field(default_factory=dict)


class AuthorizationResponse(_M):
    headers_to_backend: list[str] = Field(default_factory=list)
    headers_to_client: list[str] = Field(default_factory=list)
    headers_to_client_on_success: list[str] = Field(default_factory=list)


class ExtHttpService(_Checked):
    backend_ref: ExtBackendRef
    path_prefix: str = ""
    request_timeout: Duration | None = None
    authorization_request: AuthorizationRequest | None = None
    authorization_response: AuthorizationResponse | None = None
    retry: ExtSvcRetry | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        at_least(data, "request_timeout", _1MS, _TIMEOUT_1MS, problems)
        return problems


class BufferSettings(_M):
    max_request_bytes: int = Field(ge=1)
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


class ExtAuthProvider(_Checked):
    grpc_service: ExtGrpcService | None = None
    http_service: ExtHttpService | None = None
    headers_to_forward: list[str] | None = None
    fail_open: bool = False
    clear_route_cache: bool = False
    with_request_body: BufferSettings | None = None
    status_on_error: int = Field(403, ge=100, le=511)
    stat_prefix: str | None = Field(None, min_length=1)

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        return exactly_one(data, ("grpc_service", "http_service"))


HeaderMode = Literal["DEFAULT", "SEND", "SKIP"]
BodyMode = Literal["NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"]


class ProcessingMode(_M):
    request_header_mode: HeaderMode = "SEND"
    response_header_mode: HeaderMode = "SEND"
    request_body_mode: BodyMode = "NONE"
    response_body_mode: BodyMode = "NONE"
    request_trailer_mode: HeaderMode = "SKIP"
    response_trailer_mode: HeaderMode = "SKIP"


class MetadataForwarding(_M):
    typed: list[str] | None = Field(None, min_length=1)
    untyped: list[str] | None = Field(None, min_length=1)


class MetadataOptions(_M):
    forwarding: MetadataForwarding | None = None


Stage = Literal["Fault", "AuthN", "AuthZ", "RateLimit", "Route"]


class FilterStage(_M):
    stage: Stage
    predicate: Literal["Before", "During", "After"] = "During"
    weight: int = 0


class ExtProcProvider(_Checked):
    grpc_service: ExtGrpcService
    fail_open: bool = True
    processing_mode: ProcessingMode | None = None
    allow_processing_mode_override: bool = False
    allowed_processing_mode_overrides: list[ProcessingMode] | None = None
    message_timeout: Duration | None = None
    max_message_timeout: Duration | None = None
    stat_prefix: str | None = Field(None, min_length=1)
    route_cache_action: Literal["FromResponse", "Clear", "Retain"] = "FromResponse"
    metadata_options: MetadataOptions | None = None
    request_attributes: list[str] | None = None
    filter_stage: FilterStage | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        at_least(data, "message_timeout", _1MS, _TIMEOUT_1MS, problems)
        at_least(data, "max_message_timeout", _1MS, _TIMEOUT_1MS, problems)
        return problems


class RateLimitProvider(_Checked):
    grpc_service: ExtGrpcService
    domain: str = Field(min_length=1)
    fail_open: bool = True
    timeout: Duration = "100ms"
    x_rate_limit_headers: Literal["Off", "DraftVersion03"] = Field("Off", alias="xRateLimitHeaders")

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        crd.duration(data, "timeout", problems)  # the format only (no >= 1ms rule in the CRD)
        return problems


_EXT_TYPES = {
    "ExtAuth": "ext_auth",
    "ExtProc": "ext_proc",
    "RateLimit": "rate_limit",
    "JWT": "jwt",
    "OAuth2": "oauth2",
}
_EXT_MESSAGES = {
    "ExtAuth": "extAuth must be set when type is ExtAuth",
    "ExtProc": "extProc must be set when type is ExtProc",
    "RateLimit": "rateLimit must be set when type is RateLimit",
    "JWT": "JWT must be set when type is JWT",
    "OAuth2": "oauth2 must be set when type is OAuth2",
}


class GatewayExtensionSpec(_Checked):
    type: Literal["ExtAuth", "ExtProc", "RateLimit", "JWT", "OAuth2"] | None = None
    ext_auth: ExtAuthProvider | None = None
    ext_proc: ExtProcProvider | None = None
    rate_limit: RateLimitProvider | None = None
    jwt: dict[str, Any] | None = None
    oauth2: dict[str, Any] | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems = exactly_one(data, _EXT_TYPES.values())
        kind = get(data, "type")
        if isinstance(kind, str) and kind in _EXT_TYPES and get(data, _EXT_TYPES[kind]) is None:
            problems.append(("", _EXT_MESSAGES[kind]))
        return problems

    @property
    def kind(self) -> str:
        """``ExtAuth`` / ``ExtProc`` / ``RateLimit`` / ``JWT`` / ``OAuth2``: the populated block."""
        for kind, attr in _EXT_TYPES.items():
            if getattr(self, attr) is not None:
                return kind
        raise AssertionError("validated spec has one block")


class GatewayExtension(_Open):
    kind: Literal["GatewayExtension"]
    metadata: Metadata
    spec: GatewayExtensionSpec


# --- kgateway TrafficPolicy (docs/internals/kgateway-translation.md §2) --------------------------------

_TARGET_KINDS = "targetRefs may only reference Gateway, HTTPRoute, GRPCRoute, or ListenerSet resources"
_SECTION = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _target_kind(data: Mapping[str, Any]) -> list[Problem]:
    kind = get(data, "kind")
    if (
        not isinstance(kind, str)
        or kind in ("Gateway", "HTTPRoute", "GRPCRoute")
        or kind.endswith("ListenerSet")
    ):
        return []
    return [("", _TARGET_KINDS)]


class TargetRef(_Checked):
    group: str
    kind: str
    name: str = Field(min_length=1)
    section_name: str | None = Field(None, min_length=1, max_length=253, pattern=_SECTION.pattern)

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        return _target_kind(data)


class TargetSelector(_Checked):
    group: str
    kind: str
    match_labels: dict[str, str]
    section_name: str | None = Field(None, min_length=1, max_length=253, pattern=_SECTION.pattern)

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        return _target_kind(data)


class NamespacedRef(_M):
    name: str = Field(min_length=1)
    namespace: str | None = None


class Empty(_M):
    pass


class ExtAuthPolicy(_Checked):
    extension_ref: NamespacedRef | None = None
    with_request_body: BufferSettings | None = None
    context_extensions: dict[str, str] | None = None
    disable: Empty | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        return exactly_one(data, ("extension_ref", "disable"))


class ExtProcPolicy(_Checked):
    extension_ref: NamespacedRef | None = None
    processing_mode: ProcessingMode | None = None
    disable: Empty | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        return exactly_one(data, ("extension_ref", "disable"))


class TokenBucket(_Checked):
    max_tokens: int = Field(ge=1)
    tokens_per_fill: int = Field(1, ge=1)
    fill_interval: Duration

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        fill = crd.duration(data, "fill_interval", problems)
        if fill is not None and fill < timedelta(milliseconds=50):
            problems.append(("", "must be at least 50ms"))
        return problems


class LocalRateLimit(_M):
    token_bucket: TokenBucket | None = None
    percent_enabled: int | None = Field(None, ge=0, le=100)
    percent_enforced: int | None = Field(None, ge=0, le=100)

    @property
    def disables(self) -> bool:
        """``local: {}`` means: no local rate limit here (kgateway ``createDisabledRateLimit``)."""
        return self.token_bucket is None


class GenericEntry(_M):
    key: str = Field(min_length=1)
    value: str = Field(min_length=1)


class DescriptorEntry(_Checked):
    type: Literal["Generic", "Header", "RemoteAddress", "Path"]
    generic: GenericEntry | None = None
    header: str | None = Field(None, min_length=1)

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        kind, generic, header = get(data, "type"), get(data, "generic"), get(data, "header")
        if kind not in ("Generic", "Header", "RemoteAddress", "Path"):
            return []  # the schema says so
        ok = {
            "Generic": generic is not None and header is None,
            "Header": header is not None and generic is None,
        }.get(kind, generic is None and header is None)
        return [] if ok else [("", "exactly one entry type must be specified")]


class Descriptor(_M):
    entries: list[DescriptorEntry] = Field(min_length=1)


class GlobalRateLimit(_M):
    extension_ref: NamespacedRef
    descriptors: list[Descriptor] = Field(min_length=1)


class RateLimitPolicy(_M):
    local: LocalRateLimit | None = None
    global_: GlobalRateLimit | None = Field(None, alias="global")


# Sections of TrafficPolicy that kgateway has and this controller does not translate
# (docs/internals/kgateway-translation.md §2.3): they
# are accepted as written and reported in the status, never silently dropped.
UNSUPPORTED_SECTIONS = (
    "transformation",
    "cors",
    "csrf",
    "headerModifiers",
    "requestMirror",
    "autoHostRewrite",
    "buffer",
    "timeouts",
    "retry",
    "internalRedirect",
    "rbac",
    "jwtAuth",
    "urlRewrite",
    "compression",
    "basicAuth",
    "apiKeyAuth",
    "oauth2",
    "tracing",
    "faultInjection",
    "acl",
    "statPrefix",
)


# Of UNSUPPORTED_SECTIONS, those that restrict who gets through
# (docs/internals/kgateway-translation.md §2.3). Accepting one without enforcing it would let
# through what the policy was written to stop, so a policy carrying one is rejected instead and
# its targets answer 500 (docs/controller.md, "Differences from kgateway"). ``{disable: {}}``
# alone restricts nothing and stays a reported no-op.
SECURITY_SECTIONS = ("acl", "apiKeyAuth", "basicAuth", "jwtAuth", "oauth2", "rbac")


class TrafficPolicySpec(_Checked):
    model_config = ConfigDict(frozen=True, extra="allow", alias_generator=to_camel, populate_by_name=True)

    target_refs: list[TargetRef] | None = Field(None, min_length=1, max_length=16)
    target_selectors: list[TargetSelector] | None = None
    ext_auth: ExtAuthPolicy | None = None
    ext_proc: ExtProcPolicy | None = None
    rate_limit: RateLimitPolicy | None = None

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        known = {n for name, f in cls.model_fields.items() for n in (name, f.alias)}
        unknown = sorted(str(k) for k in data if k not in known and k not in UNSUPPORTED_SECTIONS)
        return [("", f"unknown field(s): {', '.join(unknown)}")] if unknown else []

    @property
    def unsupported(self) -> tuple[str, ...]:
        """The kgateway sections present in this spec that extsvc-controller does not translate."""
        return tuple(sorted(self.model_extra or {}))

    @property
    def unenforceable(self) -> dict[str, tuple[str | None, str] | None]:
        """Security sections that would restrict traffic: section -> the GatewayExtension it
        names (namespace or None, name), if any."""
        out: dict[str, tuple[str | None, str] | None] = {}
        for name in self.unsupported:
            value = (self.model_extra or {})[name]
            if name not in SECURITY_SECTIONS:
                continue
            if isinstance(value, dict) and set(value) == {"disable"}:
                continue  # turns off something that is not enforced anyway
            ref = value.get("extensionRef") if isinstance(value, dict) else None
            if isinstance(ref, dict) and isinstance(ref.get("name"), str):
                out[name] = (ref.get("namespace") or None, ref["name"])
            else:
                out[name] = None
        return out


class TrafficPolicy(_Open):
    kind: Literal["TrafficPolicy"]
    metadata: Metadata
    spec: TrafficPolicySpec


class Targeting(_Open):
    """Only the targeting part of a TrafficPolicy, read leniently from an invalid one."""

    target_refs: list[TargetRef] = Field(default_factory=list)
    target_selectors: list[TargetSelector] = Field(default_factory=list)


Object = Gateway | HTTPRoute | Service | Secret | ReferenceGrant | GatewayExtension | TrafficPolicy

_KINDS: dict[str, type[BaseModel]] = {
    "Gateway": Gateway,
    "HTTPRoute": HTTPRoute,
    "Service": Service,
    "Secret": Secret,
    "ReferenceGrant": ReferenceGrant,
    "GatewayExtension": GatewayExtension,
    "TrafficPolicy": TrafficPolicy,
}


def parse_object(raw: dict[str, Any]) -> tuple[Object | None, list[str]]:
    """One manifest document as a typed object, or None and the reasons it is invalid.

    Objects of kinds this controller does not read give ``(None, [])``.
    """
    kind = raw.get("kind")
    model = _KINDS.get(str(kind))
    if model is None:
        return None, []
    try:
        obj: Object = model.model_validate(raw)  # type: ignore[assignment]
    except ValidationError as exc:
        return None, format_errors(exc)
    return obj, []


def parse_targeting(raw: dict[str, Any]) -> Targeting:
    """The targetRefs/targetSelectors of a TrafficPolicy whose spec failed validation (best effort)."""
    spec = raw.get("spec") if isinstance(raw.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    refs: list[TargetRef] = []
    selectors: list[TargetSelector] = []
    for item in spec.get("targetRefs") or []:
        try:
            refs.append(TargetRef.model_validate(item))
        except ValidationError:
            continue
    for item in spec.get("targetSelectors") or []:
        try:
            selectors.append(TargetSelector.model_validate(item))
        except ValidationError:
            continue
    return Targeting(target_refs=refs, target_selectors=selectors)
