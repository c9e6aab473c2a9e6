"""Kubernetes core objects: Service, Secret, EndpointSlice."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Metadata, _Open


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


#: the label that ties an EndpointSlice to its Service
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class EndpointConditions(_Open):
    ready: bool | None = None  # unset means ready (Kubernetes' rule for consumers)
    serving: bool | None = None
    terminating: bool | None = None


class SliceEndpoint(_Open):
    addresses: list[str] = Field(default_factory=list, max_length=100)
    conditions: EndpointConditions = EndpointConditions()


class SlicePort(_Open):
    name: str | None = None
    port: int | None = None
    protocol: str = "TCP"
    app_protocol: str | None = None


class EndpointSlice(_Open):
    """Where a Service's ready Pods are (discovery.k8s.io/v1): the controller sends them as EDS."""

    kind: Literal["EndpointSlice"]
    metadata: Metadata
    address_type: str = "IPv4"
    endpoints: list[SliceEndpoint] = Field(default_factory=list, max_length=1000)
    ports: list[SlicePort] | None = None
