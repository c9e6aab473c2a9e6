"""kgateway's GatewayExtension (docs/internals/kgateway-translation.md §1.1) and its providers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from .. import crd
from ..crd import Problem, at_least, exactly_one, get
from .base import _1MS, _M, _TIMEOUT_1MS, Duration, Metadata, _Checked, _Open


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


class _TimedService(_Checked):
    """A service reference with a ``requestTimeout``, which must be at least 1 ms."""

    @classmethod
    def _rules(cls, data: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        at_least(data, "request_timeout", _1MS, _TIMEOUT_1MS, problems)
        return problems


class ExtGrpcService(_TimedService):
    backend_ref: ExtBackendRef
    authority: str | None = None
    request_timeout: Duration | None = None
    retry: ExtSvcRetry | None = None


class AuthorizationRequest(_M):
    headers_to_add: dict[str, str] = Field(default_factory=dict)


class AuthorizationResponse(_M):
    headers_to_backend: list[str] = Field(default_factory=list)
    headers_to_client: list[str] = Field(default_factory=list)
    headers_to_client_on_success: list[str] = Field(default_factory=list)


class ExtHttpService(_TimedService):
    backend_ref: ExtBackendRef
    path_prefix: str = ""
    request_timeout: Duration | None = None
    authorization_request: AuthorizationRequest | None = None
    authorization_response: AuthorizationResponse | None = None
    retry: ExtSvcRetry | None = None


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
