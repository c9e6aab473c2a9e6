"""ext_authz: the provider filter (GatewayExtension) and its per-route settings (TrafficPolicy)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    HeaderValue,
    HttpUri,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz import v3 as ext_authz
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListStringMatcher,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any

from .. import model
from .clusters import grpc_service, retry_policy
from .names import DISABLE_EXT_AUTH_NS
from .packing import enable, pack


def _exact(names: Iterable[str]) -> ListStringMatcher:
    return ListStringMatcher(patterns=[StringMatcher(exact=n) for n in names])


def _buffer(body: model.BufferSettings | None) -> ext_authz.BufferSettings | None:
    if body is None:
        return None
    return ext_authz.BufferSettings(
        max_request_bytes=body.max_request_bytes,
        allow_partial_message=body.allow_partial_message,
        pack_as_bytes=body.pack_as_bytes,
    )


def ext_authz_filter(name: str, spec: model.ExtAuthProvider, cluster_name: str) -> HttpFilter:
    grpc = http = None
    if spec.grpc_service is not None:
        grpc = grpc_service(spec.grpc_service, cluster_name)
    else:
        hs = spec.http_service
        assert hs is not None
        timeout = model.parse_duration(hs.request_timeout) if hs.request_timeout else timedelta(seconds=2)
        request = response = None
        if hs.authorization_request is not None:
            request = ext_authz.AuthorizationRequest(
                headers_to_add=[
                    HeaderValue(key=k, value=v)
                    for k, v in sorted(hs.authorization_request.headers_to_add.items())
                ]
            )
        if hs.authorization_response is not None:
            r = hs.authorization_response
            response = ext_authz.AuthorizationResponse(
                allowed_upstream_headers=_exact(r.headers_to_backend) if r.headers_to_backend else None,
                allowed_client_headers=_exact(r.headers_to_client) if r.headers_to_client else None,
                allowed_client_headers_on_success=(
                    _exact(r.headers_to_client_on_success) if r.headers_to_client_on_success else None
                ),
            )
        http = ext_authz.HttpService(
            server_uri=HttpUri(uri=cluster_name, cluster=cluster_name, timeout=timeout),
            path_prefix=hs.path_prefix,
            authorization_request=request,
            authorization_response=response,
            retry_policy=retry_policy(hs.retry),
        )
    config = ext_authz.ExtAuthz(
        grpc_service=grpc,
        http_service=http,
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=spec.fail_open,
        clear_route_cache=spec.clear_route_cache,
        with_request_body=_buffer(spec.with_request_body),
        status_on_error=HttpStatus(code=StatusCode(spec.status_on_error)),
        stat_prefix=spec.stat_prefix or "",
        allowed_headers=_exact(spec.headers_to_forward) if spec.headers_to_forward else None,
        # Skipped when global_disable/ext_auth has set the metadata:
        # docs/internals/kgateway-translation.md §3.5.
        filter_enabled_metadata=MetadataMatcher(
            filter=DISABLE_EXT_AUTH_NS,
            path=[MetadataMatcherPathSegment(key="disable")],
            value=ValueMatcher(bool_match=True),
            invert=True,
        ),
    )
    return HttpFilter(name=name, disabled=True, typed_config=pack(config))


def ext_authz_per_route(policy: model.ExtAuthPolicy) -> Any:
    if not policy.context_extensions and policy.with_request_body is None:
        return enable()
    return pack(
        ext_authz.ExtAuthzPerRoute(
            check_settings=ext_authz.CheckSettings(
                context_extensions=dict(sorted((policy.context_extensions or {}).items())),
                with_request_body=_buffer(policy.with_request_body),
            )
        )
    )
