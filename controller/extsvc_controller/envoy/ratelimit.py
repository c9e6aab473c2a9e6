"""Rate limiting: the global (rate-limit service) and local filters and their per-route settings."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    RuntimeFractionalPercent,
)
from envoy_data_plane.envoy.config.ratelimit.v3 import RateLimitServiceConfig
from envoy_data_plane.envoy.config.route.v3 import (
    RateLimit,
    RateLimitAction,
    RateLimitActionGenericKey,
    RateLimitActionRemoteAddress,
    RateLimitActionRequestHeaders,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.ratelimit import v3 as ratelimit
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.v3 import FractionalPercent, TokenBucket
from envoy_data_plane.google.protobuf import Any

from .. import model
from .clusters import grpc_service
from .names import LOCAL_RATELIMIT
from .packing import pack


def ratelimit_filter(name: str, spec: model.RateLimitProvider, cluster_name: str) -> HttpFilter:
    config = ratelimit.RateLimit(
        domain=spec.domain,
        timeout=model.parse_duration(spec.timeout),
        failure_mode_deny=not spec.fail_open,
        enable_x_ratelimit_headers=(
            ratelimit.RateLimitXRateLimitHeadersRfcVersion.DRAFT_VERSION_03
            if spec.x_rate_limit_headers == "DraftVersion03"
            else ratelimit.RateLimitXRateLimitHeadersRfcVersion.OFF
        ),
        rate_limit_service=RateLimitServiceConfig(
            grpc_service=grpc_service(spec.grpc_service, cluster_name), transport_api_version=ApiVersion.V3
        ),
    )
    return HttpFilter(name=name, disabled=True, typed_config=pack(config))


def local_ratelimit_filter() -> HttpFilter:
    return HttpFilter(
        name=LOCAL_RATELIMIT,
        disabled=True,
        typed_config=pack(LocalRateLimit(stat_prefix="http_local_rate_limiter")),
    )


def _action(entry: model.DescriptorEntry) -> RateLimitAction:
    if entry.type == "Generic":
        assert entry.generic is not None
        return RateLimitAction(
            generic_key=RateLimitActionGenericKey(
                descriptor_key=entry.generic.key, descriptor_value=entry.generic.value
            )
        )
    if entry.type == "Header":
        assert entry.header is not None
        return RateLimitAction(
            request_headers=RateLimitActionRequestHeaders(
                header_name=entry.header, descriptor_key=entry.header
            )
        )
    if entry.type == "RemoteAddress":
        return RateLimitAction(remote_address=RateLimitActionRemoteAddress())
    return RateLimitAction(
        request_headers=RateLimitActionRequestHeaders(header_name=":path", descriptor_key="path")
    )


def ratelimit_per_route(policy: model.GlobalRateLimit) -> Any:
    return pack(
        ratelimit.RateLimitPerRoute(
            rate_limits=[RateLimit(actions=[_action(e) for e in d.entries]) for d in policy.descriptors]
        )
    )


def _percent(value: int | None, key: str) -> RuntimeFractionalPercent:
    return RuntimeFractionalPercent(
        runtime_key=key, default_value=FractionalPercent(numerator=100 if value is None else value)
    )


def local_ratelimit_per_route(policy: model.LocalRateLimit) -> Any:
    bucket = policy.token_bucket
    if bucket is None:
        # docs/internals/kgateway-translation.md §3.5: `local: {}` -> a bucket that is never enabled (0 %).
        return pack(
            LocalRateLimit(
                stat_prefix="http_local_rate_limiter",
                token_bucket=TokenBucket(
                    max_tokens=1, tokens_per_fill=1, fill_interval=timedelta(microseconds=1)
                ),
                filter_enabled=RuntimeFractionalPercent(
                    runtime_key="local_rate_limit_disabled", default_value=FractionalPercent()
                ),
            )
        )
    return pack(
        LocalRateLimit(
            stat_prefix="http_local_rate_limiter",
            token_bucket=TokenBucket(
                max_tokens=bucket.max_tokens,
                tokens_per_fill=bucket.tokens_per_fill,
                fill_interval=model.parse_duration(bucket.fill_interval),
            ),
            filter_enabled=_percent(policy.percent_enabled, "local_rate_limit_enabled"),
            filter_enforced=_percent(policy.percent_enforced, "local_rate_limit_enforced"),
        )
    )
