"""The base models (camelCase on the wire, immutable; CEL rules or lenient), metadata, API groups."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, model_validator
from pydantic.alias_generators import to_camel

from .. import crd
from ..crd import Problem

GATEWAY_API = "gateway.networking.k8s.io"
KGATEWAY = "gateway.kgateway.dev"

_1MS = timedelta(milliseconds=1)
_TIMEOUT_1MS = "timeout must be at least 1ms."
#: A duration as kgateway writes it ("1s", "250ms"); checked by the CRD rules, see :mod:`.crd`.
Duration = Annotated[str, Field(max_length=32)]


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
