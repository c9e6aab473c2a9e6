"""Typed views of the Kubernetes objects the controller reads.

Gateway API (``Gateway``, ``HTTPRoute``, ``ReferenceGrant``), core (``Service``, ``Secret``) and
kgateway's ``GatewayExtension`` / ``TrafficPolicy`` (docs/internals/kgateway-translation.md §1, §2). The CRDs'
CEL rules are checked here with the CRDs' own messages, so a manifest the API server would refuse
is refused here with the same words.

Parsing never raises for a bad object: :func:`parse_object` returns the object (or None) and the
list of problems, and the translator reports them in the object's status.

By concern: ``base`` (the base models, metadata, API groups), ``core`` (Service, Secret),
``gateway_api``, ``gateway_extension`` and ``traffic_policy`` (kgateway's CRDs, with their CEL rules);
this package re-exports them all and parses a manifest into one (:func:`parse_object`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from ..crd import format_errors, parse_duration
from .base import (
    GATEWAY_API,
    KGATEWAY,
    Duration,
    Metadata,
)
from .core import (
    SERVICE_NAME_LABEL,
    EndpointSlice,
    Secret,
    Service,
    ServicePort,
    ServiceSpec,
)
from .gateway_api import (
    AllowedRoutes,
    BackendRef,
    Gateway,
    GatewaySpec,
    GrantFrom,
    GrantTo,
    GRPCRoute,
    HeaderMatch,
    HeaderModifier,
    HeaderValue,
    HTTPRoute,
    HTTPRouteSpec,
    Listener,
    ListenerTLS,
    LocalObjectReference,
    ParentReference,
    PathMatch,
    ReferenceGrant,
    ReferenceGrantSpec,
    RouteFilter,
    RouteMatch,
    RouteNamespaces,
    RouteRule,
    SecretObjectReference,
)
from .gateway_extension import (
    AuthorizationRequest,
    AuthorizationResponse,
    BodyMode,
    BufferSettings,
    ExtAuthProvider,
    ExtBackendRef,
    ExtGrpcService,
    ExtHttpService,
    ExtProcProvider,
    ExtSvcRetry,
    FilterStage,
    GatewayExtension,
    GatewayExtensionSpec,
    HeaderMode,
    MetadataForwarding,
    MetadataOptions,
    ProcessingMode,
    RateLimitProvider,
    RetryBackoff,
    Stage,
)
from .traffic_policy import (
    SECURITY_SECTIONS,
    UNSUPPORTED_SECTIONS,
    Descriptor,
    DescriptorEntry,
    Empty,
    ExtAuthPolicy,
    ExtProcPolicy,
    GenericEntry,
    GlobalRateLimit,
    LocalRateLimit,
    NamespacedRef,
    RateLimitPolicy,
    Targeting,
    TargetRef,
    TargetSelector,
    TokenBucket,
    TrafficPolicy,
    TrafficPolicySpec,
    parse_targeting,
)

__all__ = [
    "GATEWAY_API",
    "KGATEWAY",
    "SECURITY_SECTIONS",
    "SERVICE_NAME_LABEL",
    "UNSUPPORTED_SECTIONS",
    "AllowedRoutes",
    "AuthorizationRequest",
    "AuthorizationResponse",
    "BackendRef",
    "BodyMode",
    "BufferSettings",
    "Descriptor",
    "DescriptorEntry",
    "Duration",
    "Empty",
    "EndpointSlice",
    "ExtAuthPolicy",
    "ExtAuthProvider",
    "ExtBackendRef",
    "ExtGrpcService",
    "ExtHttpService",
    "ExtProcPolicy",
    "ExtProcProvider",
    "ExtSvcRetry",
    "FilterStage",
    "GRPCRoute",
    "Gateway",
    "GatewayExtension",
    "GatewayExtensionSpec",
    "GatewaySpec",
    "GenericEntry",
    "GlobalRateLimit",
    "GrantFrom",
    "GrantTo",
    "HTTPRoute",
    "HTTPRouteSpec",
    "HeaderMatch",
    "HeaderMode",
    "HeaderModifier",
    "HeaderValue",
    "Listener",
    "ListenerTLS",
    "LocalObjectReference",
    "LocalRateLimit",
    "Metadata",
    "MetadataForwarding",
    "MetadataOptions",
    "NamespacedRef",
    "Object",
    "ParentReference",
    "PathMatch",
    "ProcessingMode",
    "RateLimitPolicy",
    "RateLimitProvider",
    "ReferenceGrant",
    "ReferenceGrantSpec",
    "RetryBackoff",
    "RouteFilter",
    "RouteMatch",
    "RouteNamespaces",
    "RouteRule",
    "Secret",
    "SecretObjectReference",
    "Service",
    "ServicePort",
    "ServiceSpec",
    "Stage",
    "TargetRef",
    "TargetSelector",
    "Targeting",
    "TokenBucket",
    "TrafficPolicy",
    "TrafficPolicySpec",
    "parse_duration",
    "parse_object",
    "parse_targeting",
]

Object = (
    Gateway
    | HTTPRoute
    | GRPCRoute
    | Service
    | Secret
    | EndpointSlice
    | ReferenceGrant
    | GatewayExtension
    | TrafficPolicy
)

_KINDS: dict[str, type[BaseModel]] = {
    "Gateway": Gateway,
    "HTTPRoute": HTTPRoute,
    "GRPCRoute": GRPCRoute,
    "Service": Service,
    "Secret": Secret,
    "EndpointSlice": EndpointSlice,
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
