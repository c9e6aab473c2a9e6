"""kgateway's TrafficPolicy (docs/internals/kgateway-translation.md §2): targeting, extAuth, extProc,
rate limits."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .. import crd
from ..crd import Problem, exactly_one, get
from .base import _M, Duration, Metadata, _Checked, _Open
from .gateway_extension import BufferSettings, ProcessingMode

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
