"""The kinds the translator reads, where they live in the API, and what of them is kept.

Only what the translator needs is kept in memory: ``managedFields`` and the
``last-applied-configuration`` annotation (which, for a Secret, holds its data in clear) are
dropped, and Secrets other than ``kubernetes.io/tls`` are not kept at all (the API has no
server-side filter on ``type`` that a watch could use, so this is done client-side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightkube.core.resource import NamespacedResourceG
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Secret, Service
from lightkube.resources.discovery_v1 import EndpointSlice

from ..model import GATEWAY_API, KGATEWAY

_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TLS_SECRET = "kubernetes.io/tls"  # noqa: S105 (a Secret type, not a password)


@dataclass(frozen=True, slots=True)
class Kind:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def resource(self) -> type[NamespacedResourceG]:
        """The lightkube resource class (generic for CRDs and Gateway API, typed for core kinds)."""
        builtin = _BUILTIN.get(self.kind)
        if builtin is not None:
            return builtin
        res = create_namespaced_resource(self.group, self.version, self.kind, self.plural)
        return res


_BUILTIN: dict[str, type[NamespacedResourceG]] = {
    "Service": Service,
    "Secret": Secret,
    "EndpointSlice": EndpointSlice,
}

GATEWAY = Kind("Gateway", GATEWAY_API, "v1", "gateways")
HTTPROUTE = Kind("HTTPRoute", GATEWAY_API, "v1", "httproutes")
GRPCROUTE = Kind("GRPCRoute", GATEWAY_API, "v1", "grpcroutes")
REFERENCEGRANT = Kind("ReferenceGrant", GATEWAY_API, "v1beta1", "referencegrants")
SERVICE = Kind("Service", "", "v1", "services")
SECRET = Kind("Secret", "", "v1", "secrets")
ENDPOINTSLICE = Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices")
GATEWAYEXTENSION = Kind("GatewayExtension", KGATEWAY, "v1alpha1", "gatewayextensions")
TRAFFICPOLICY = Kind("TrafficPolicy", KGATEWAY, "v1alpha1", "trafficpolicies")

# In the order objects() returns them (providers before their users, like a manifest would).
KINDS: tuple[Kind, ...] = (
    GATEWAY,
    HTTPROUTE,
    GRPCROUTE,
    REFERENCEGRANT,
    SERVICE,
    ENDPOINTSLICE,
    SECRET,
    GATEWAYEXTENSION,
    TRAFFICPOLICY,
)
BY_NAME: dict[str, Kind] = {k.kind: k for k in KINDS}


def prune(kind: Kind, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The object as kept (with ``kind``/``apiVersion``, which watch items of typed lists lack),
    or None when it is not kept at all."""
    if kind.kind == "Secret" and obj.get("type") != TLS_SECRET:
        return None
    out = {**obj, "kind": kind.kind, "apiVersion": kind.api_version}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k != "managedFields"}
        annotations = meta.get("annotations")
        if isinstance(annotations, dict) and _LAST_APPLIED in annotations:
            meta["annotations"] = {k: v for k, v in annotations.items() if k != _LAST_APPLIED}
        out["metadata"] = meta
    return out


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (objects from outside are untrusted)."""
    return value if isinstance(value, dict) else {}


def identity(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of an object, or None when it has no usable name."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    name, ns = meta.get("name"), meta.get("namespace") or ""
    if not isinstance(name, str) or not name or not isinstance(ns, str):
        return None
    return ns, name


def resource_version(obj: dict[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None
