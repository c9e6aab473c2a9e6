"""Kubernetes core objects: Service, Secret."""

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
