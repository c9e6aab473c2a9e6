"""Typed Envoy config, built with envoy-data-plane (the only module that imports it).

envoy-data-plane's dataclasses check field names and types at construction and pack ``Any``
with the right type URL. They are for the controller only: the server's request path uses the
upb classes of xds-protos, which are several times faster.

Every builder here is pure: plain values in, a message out. Filter names and shapes follow
kgateway's scheme (docs/internals/kgateway-translation.md §3.1): one filter per provider, inserted
``disabled: true`` and
switched on per scope by ``typed_per_filter_config``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import gc
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any as TAny

import betterproto2
import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterDnsLookupFamily
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    BackoffStrategy,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HttpUri,
    RetryPolicy,
    RuntimeFractionalPercent,
    SocketAddress,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import Metadata as CoreMetadata
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, FilterChainMatch, Listener
from envoy_data_plane.envoy.config.ratelimit.v3 import RateLimitServiceConfig
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    FilterConfig,
    HeaderMatcher,
    QueryParameterMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionGenericKey,
    RateLimitActionRemoteAddress,
    RateLimitActionRequestHeaders,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.filters.http.composite.v3 import Composite, ExecuteFilterAction
from envoy_data_plane.envoy.extensions.filters.http.ext_authz import v3 as ext_authz
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.ratelimit import v3 as ratelimit
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.set_metadata import v3 as set_metadata
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3 import (
    DynamicMetadataInput,
    DynamicMetadataInputPathSegment,
)
from envoy_data_plane.envoy.extensions.matching.input_matchers.metadata import v3 as metadata_matcher
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    Secret,
    TlsCertificate,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListStringMatcher,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import FractionalPercent, HttpStatus, StatusCode, TokenBucket
from envoy_data_plane.google.protobuf import Any, Struct, Value
from envoy_data_plane.message_pool import default_message_pool
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsTypedExtensionConfig
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
)

from . import model

__all__ = [
    "Any",
    "Bootstrap",
    "Cluster",
    "Filter",
    "FilterChain",
    "HttpFilter",
    "Listener",
    "Route",
    "RouteConfiguration",
    "Secret",
    "VirtualHost",
]


# Metadata namespaces of kgateway's global-disable filters (docs/internals/kgateway-translation.md §3.5).
DISABLE_EXT_AUTH_NS = "dev.kgateway.disable_ext_auth"
DISABLE_EXT_PROC_NS = "dev.kgateway.disable_ext_proc"
DISABLE_EXT_AUTH = "global_disable/ext_auth"
DISABLE_EXT_PROC = "global_disable/ext_proc"
LOCAL_RATELIMIT = "ratelimit/local"
ROUTER = "envoy.filters.http.router"
REPLACED_BODY = "invalid route configuration detected and replaced with a direct response."
# extsvc reads the policy name from this gRPC metadata while grpcio cannot read :authority
# (docs/operators.md, "Choosing the policy for a request").
AUTHORITY_METADATA = "x-extsvc-authority"


class TypedAny(Any):
    """An ``Any`` that keeps its message typed until output, instead of serializing it now.

    ``Any.pack`` serializes at once, and the HTTP connection manager's ``Any`` embeds the whole
    RouteConfiguration, so packing during translation serialized everything (and ``to_dict``
    parsed it all back): 10 s for 1,000 routes. This subclass is still an ``Any`` to the
    dataclasses' validation; ``type_url`` comes from the message pool as in ``Any.pack``; the
    message was validated when it was built. :func:`to_dict` writes it without any round trip,
    and ``value`` still serializes on demand, so ``bytes(message)`` stays correct (for xDS).
    """

    # The subclass is not a generated dataclass: reuse Any's field metadata.
    _betterproto_meta = Any._betterproto  # type: ignore[arg-type]  # (betterproto2's classproperty typing)

    def __init__(self, message: betterproto2.Message) -> None:
        self._unknown_fields = b""
        self.type_url = default_message_pool.type_to_url[type(message)]
        self.message = message

    @property
    def value(self) -> bytes:  # type: ignore[override]  # read-only: derived from the message
        return bytes(self.message)

    def _validate(self) -> None:
        """Nothing to do: ``type_url`` is the pool's and the message was validated when built."""

    def __copy__(self, _: TAny = None) -> TypedAny:
        return TypedAny(self.message)

    def __deepcopy__(self, memo: TAny = None) -> TypedAny:
        return TypedAny(copy.deepcopy(self.message, memo))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building (or writing) a whole config.

    Translation and rendering create ~10^5 short-lived, acyclic objects next to a large live
    tree, and each generation-2 collection walks that tree: half of the render time for 1,000
    routes (bench/controller_bench.py). Reference counting still frees everything; nested use
    is fine (only the outermost one re-enables).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def pack(message: betterproto2.Message) -> Any:
    return TypedAny(message)


def enable() -> Any:
    """``FilterConfig{config: {}}``: switches a ``disabled: true`` filter on for a scope."""
    return pack(FilterConfig(config=Any()))


# --- clusters -------------------------------------------------------------------------------------


def cluster(name: str, host: str, port: int, *, http2: bool, static: bool) -> Cluster:
    """A cluster for one Service port; STATIC for an IP (``--endpoints``), STRICT_DNS otherwise."""
    options = {}
    if http2:
        # docs/internals/envoy-behaviour.md §1.1: a gRPC extension cluster must speak HTTP/2.
        options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] = pack(
            HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=_http2_options()
                )
            )
        )
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if static else ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO if static else ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=timedelta(seconds=5),
        typed_extension_protocol_options=options,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(host, port)))]
                )
            ],
        ),
    )


def _http2_options() -> TAny:
    from envoy_data_plane.envoy.config.core.v3 import Http2ProtocolOptions

    return Http2ProtocolOptions()


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


# --- providers (GatewayExtension) -----------------------------------------------------------------


def _retry(retry: model.ExtSvcRetry | None) -> RetryPolicy | None:
    if retry is None:
        return None
    backoff = None
    if retry.backoff is not None:
        backoff = BackoffStrategy(
            base_interval=model.parse_duration(retry.backoff.base_interval),
            max_interval=(
                model.parse_duration(retry.backoff.max_interval) if retry.backoff.max_interval else None
            ),
        )
    return RetryPolicy(num_retries=retry.attempts, retry_back_off=backoff)


def grpc_service(svc: model.ExtGrpcService, cluster_name: str) -> GrpcService:
    authority = svc.authority or ""
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=cluster_name, authority=authority),
        timeout=model.parse_duration(svc.request_timeout) if svc.request_timeout else None,
        retry_policy=_retry(svc.retry),
        initial_metadata=[HeaderValue(key=AUTHORITY_METADATA, value=authority)] if authority else [],
    )


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
            retry_policy=_retry(hs.retry),
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


def _mode(mode: model.ProcessingMode) -> ext_proc.ProcessingMode:
    return ext_proc.ProcessingMode(
        request_header_mode=ext_proc.ProcessingModeHeaderSendMode[mode.request_header_mode],
        response_header_mode=ext_proc.ProcessingModeHeaderSendMode[mode.response_header_mode],
        request_body_mode=ext_proc.ProcessingModeBodySendMode[mode.request_body_mode],
        response_body_mode=ext_proc.ProcessingModeBodySendMode[mode.response_body_mode],
        request_trailer_mode=ext_proc.ProcessingModeHeaderSendMode[mode.request_trailer_mode],
        response_trailer_mode=ext_proc.ProcessingModeHeaderSendMode[mode.response_trailer_mode],
    )


_CACHE_ACTION = {"FromResponse": "DEFAULT", "Clear": "CLEAR", "Retain": "RETAIN"}


def ext_proc_filter(name: str, spec: model.ExtProcProvider, cluster_name: str) -> HttpFilter:
    """ext_proc wrapped in a composite filter whose matcher skips it when global_disable/ext_proc ran."""
    forwarding = None
    if spec.metadata_options is not None and spec.metadata_options.forwarding is not None:
        f = spec.metadata_options.forwarding
        forwarding = ext_proc.MetadataOptions(
            forwarding_namespaces=ext_proc.MetadataOptionsMetadataNamespaces(
                typed=list(f.typed or ()), untyped=list(f.untyped or ())
            )
        )
    processor = ext_proc.ExternalProcessor(
        grpc_service=grpc_service(spec.grpc_service, cluster_name),
        failure_mode_allow=spec.fail_open,
        processing_mode=_mode(spec.processing_mode or model.ProcessingMode()),
        allow_mode_override=spec.allow_processing_mode_override,
        allowed_override_modes=[_mode(m) for m in spec.allowed_processing_mode_overrides or ()],
        message_timeout=model.parse_duration(spec.message_timeout) if spec.message_timeout else None,
        max_message_timeout=(
            model.parse_duration(spec.max_message_timeout) if spec.max_message_timeout else None
        ),
        stat_prefix=spec.stat_prefix or "",
        route_cache_action=ext_proc.ExternalProcessorRouteCacheAction[_CACHE_ACTION[spec.route_cache_action]],
        metadata_options=forwarding,
        request_attributes=list(spec.request_attributes or ()),
    )
    matcher = Matcher(
        matcher_list=MatcherMatcherList(
            matchers=[
                MatcherMatcherListFieldMatcher(
                    predicate=MatcherMatcherListPredicate(
                        single_predicate=MatcherMatcherListPredicateSinglePredicate(
                            input=XdsTypedExtensionConfig(
                                name="disable_ext_proc",
                                typed_config=pack(
                                    DynamicMetadataInput(
                                        filter=DISABLE_EXT_PROC_NS,
                                        path=[DynamicMetadataInputPathSegment(key="disable")],
                                    )
                                ),
                            ),
                            custom_match=XdsTypedExtensionConfig(
                                name="disable_ext_proc",
                                typed_config=pack(
                                    metadata_matcher.Metadata(
                                        value=ValueMatcher(bool_match=True), invert=True
                                    )
                                ),
                            ),
                        )
                    ),
                    on_match=MatcherOnMatch(
                        action=XdsTypedExtensionConfig(
                            name="composite-action",
                            typed_config=pack(
                                ExecuteFilterAction(
                                    typed_config=TypedExtensionConfig(
                                        name="envoy.filters.http.ext_proc", typed_config=pack(processor)
                                    )
                                )
                            ),
                        )
                    ),
                )
            ]
        )
    )
    config = ExtensionWithMatcher(
        extension_config=TypedExtensionConfig(name="composite", typed_config=pack(Composite())),
        xds_matcher=matcher,
    )
    return HttpFilter(name=name, disabled=True, typed_config=pack(config))


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


def _set_metadata(namespace: str) -> set_metadata.Config:
    return set_metadata.Config(
        metadata=[
            set_metadata.Metadata(
                metadata_namespace=namespace, value=Struct(fields={"disable": Value(bool_value=True)})
            )
        ]
    )


def disable_filter(name: str) -> HttpFilter:
    namespace = DISABLE_EXT_AUTH_NS if name == DISABLE_EXT_AUTH else DISABLE_EXT_PROC_NS
    return HttpFilter(name=name, disabled=True, typed_config=pack(_set_metadata(namespace)))


def router_filter() -> HttpFilter:
    return HttpFilter(name=ROUTER, typed_config=pack(Router()))


# --- per-route settings (TrafficPolicy) -----------------------------------------------------------


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


def ext_proc_per_route(policy: model.ExtProcPolicy) -> Any:
    mode = _mode(policy.processing_mode) if policy.processing_mode is not None else None
    return pack(ext_proc.ExtProcPerRoute(overrides=ext_proc.ExtProcOverrides(processing_mode=mode)))


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


# --- routes ---------------------------------------------------------------------------------------


def route_match(match: model.RouteMatch) -> RouteMatch:
    path = match.path or model.PathMatch()
    kwargs: dict[str, TAny] = {}
    if path.type == "Exact":
        kwargs["path"] = path.value
    elif path.type == "RegularExpression":
        kwargs["safe_regex"] = RegexMatcher(regex=path.value)
    elif path.value.rstrip("/") == "":
        kwargs["prefix"] = "/"
    else:
        kwargs["path_separated_prefix"] = path.value.rstrip("/")
    headers = [
        HeaderMatcher(
            name=h.name,
            string_match=(
                StringMatcher(exact=h.value)
                if h.type == "Exact"
                else StringMatcher(safe_regex=RegexMatcher(regex=h.value))
            ),
        )
        for h in match.headers
    ]
    if match.method:
        headers.append(HeaderMatcher(name=":method", string_match=StringMatcher(exact=match.method)))
    query = [
        QueryParameterMatcher(
            name=q.name,
            string_match=(
                StringMatcher(exact=q.value)
                if q.type == "Exact"
                else StringMatcher(safe_regex=RegexMatcher(regex=q.value))
            ),
        )
        for q in match.query_params
    ]
    return RouteMatch(headers=headers, query_parameters=query, **kwargs)


def header_options(modifier: model.HeaderModifier | None) -> tuple[list[HeaderValueOption], list[str]]:
    if modifier is None:
        return [], []
    from envoy_data_plane.envoy.config.core.v3 import HeaderValueOptionHeaderAppendAction as Action

    add = [
        HeaderValueOption(
            header=HeaderValue(key=h.name, value=h.value), append_action=Action.OVERWRITE_IF_EXISTS_OR_ADD
        )
        for h in modifier.set
    ]
    add += [
        HeaderValueOption(
            header=HeaderValue(key=h.name, value=h.value), append_action=Action.APPEND_IF_EXISTS_OR_ADD
        )
        for h in modifier.add
    ]
    return add, list(modifier.remove)


def route(
    name: str,
    match: RouteMatch,
    clusters: Sequence[tuple[str, int]],
    per_filter: Mapping[str, Any],
    headers: tuple[list[HeaderValueOption], list[str]],
    metadata: Mapping[str, Sequence[str]],
) -> Route:
    """A route to ``clusters`` ((name, weight), one or more), or a 500 when there is none."""
    if not clusters:
        return Route(
            name=name,
            match=match,
            direct_response=DirectResponseAction(
                status=500, body=DataSource(inline_string="no valid backend for this route\n")
            ),
            metadata=_merge_metadata(metadata),
        )
    if len(clusters) == 1:
        action = RouteAction(cluster=clusters[0][0])
    else:
        action = RouteAction(
            weighted_clusters=WeightedCluster(
                clusters=[WeightedClusterClusterWeight(name=c, weight=w) for c, w in clusters]
            )
        )
    return Route(
        name=name,
        match=match,
        route=action,
        typed_per_filter_config=dict(per_filter),
        request_headers_to_add=headers[0],
        request_headers_to_remove=headers[1],
        metadata=_merge_metadata(metadata),
    )


def replaced_route(name: str, match: RouteMatch) -> Route:
    """A rule with an invalid policy answers 500: fail closed.

    See docs/internals/kgateway-translation.md §3.7.
    """
    return Route(
        name=name,
        match=match,
        direct_response=DirectResponseAction(status=500, body=DataSource(inline_string=REPLACED_BODY)),
    )


MERGE_ORIGIN = "merge.TrafficPolicy.gateway.kgateway.dev"


def _merge_metadata(origins: Mapping[str, Sequence[str]]) -> CoreMetadata | None:
    """kgateway's merge-origin metadata: which policy each field came from (for debugging)."""
    if not origins:
        return None
    from envoy_data_plane.google.protobuf import ListValue

    fields = {
        k: Value(list_value=ListValue(values=[Value(string_value=s) for s in v])) for k, v in origins.items()
    }
    return CoreMetadata(filter_metadata={MERGE_ORIGIN: Struct(fields=fields)})


def virtual_host(
    name: str,
    domains: Sequence[str],
    routes: Sequence[Route],
    per_filter: Mapping[str, Any],
    metadata: Mapping[str, Sequence[str]],
) -> VirtualHost:
    return VirtualHost(
        name=name,
        domains=list(domains),
        routes=list(routes),
        typed_per_filter_config=dict(per_filter),
        metadata=_merge_metadata(metadata),
    )


def route_configuration(
    name: str,
    vhosts: Sequence[VirtualHost],
    per_filter: Mapping[str, Any],
    metadata: Mapping[str, Sequence[str]],
) -> RouteConfiguration:
    return RouteConfiguration(
        name=name,
        virtual_hosts=list(vhosts),
        typed_per_filter_config=dict(per_filter),
        metadata=_merge_metadata(metadata),
    )


def replaced_route_configuration(name: str) -> RouteConfiguration:
    """A Gateway- or listener-level invalid policy: the whole RouteConfiguration answers 500."""
    return RouteConfiguration(
        name=name,
        virtual_hosts=[
            VirtualHost(
                name="default",
                domains=["*"],
                routes=[
                    Route(
                        name="replaced",
                        match=RouteMatch(prefix="/"),
                        direct_response=DirectResponseAction(
                            status=500, body=DataSource(inline_string=REPLACED_BODY)
                        ),
                    )
                ],
            )
        ],
    )


# --- listeners and bootstrap ----------------------------------------------------------------------


def http_connection_manager(routes: RouteConfiguration, filters: Sequence[HttpFilter]) -> Filter:
    hcm = HttpConnectionManager(
        stat_prefix="http",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        route_config=routes,
        http_filters=list(filters),
    )
    return Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))


def filter_chain(
    hcm: Filter, *, server_names: Sequence[str] = (), secret_names: Sequence[str] = (), name: str = ""
) -> FilterChain:
    socket = None
    match = None
    if secret_names:
        tls = DownstreamTlsContext(
            common_tls_context=CommonTlsContext(
                tls_certificate_sds_secret_configs=[SdsSecretConfig(name=s) for s in secret_names]
            )
        )
        socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(tls))
        match = FilterChainMatch(server_names=list(server_names)) if server_names else None
    return FilterChain(name=name, filters=[hcm], transport_socket=socket, filter_chain_match=match)


def listener(name: str, host: str, port: int, chains: Sequence[FilterChain]) -> Listener:
    tls = any(c.transport_socket is not None for c in chains)
    filters = []
    if tls:
        from envoy_data_plane.envoy.config.listener.v3 import ListenerFilter

        inspector = _tls_inspector()
        filters = [ListenerFilter(name="envoy.filters.listener.tls_inspector", typed_config=pack(inspector))]
    return Listener(
        name=name, address=_address(host, port), filter_chains=list(chains), listener_filters=filters
    )


def _tls_inspector() -> betterproto2.Message:
    from envoy_data_plane.envoy.extensions.filters.listener.tls_inspector.v3 import TlsInspector

    return TlsInspector()


def tls_secret(name: str, cert_pem: bytes, key_pem: bytes) -> Secret:
    """A certificate inlined in the bootstrap (``render`` without ``--secret-dir``)."""
    return Secret(
        name=name,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(inline_bytes=cert_pem),
            private_key=DataSource(inline_bytes=key_pem),
        ),
    )


def tls_secret_files(name: str, cert_path: str, key_path: str) -> Secret:
    """A certificate Envoy reads from files (the bootstrap refers to the key, never holds it)."""
    return Secret(
        name=name,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(filename=cert_path),
            private_key=DataSource(filename=key_path),
        ),
    )


def bootstrap(
    admin: tuple[str, int],
    listeners: Sequence[Listener],
    clusters: Sequence[Cluster],
    secrets: Sequence[Secret],
) -> Bootstrap:
    return Bootstrap(
        admin=Admin(address=_address(*admin)),
        static_resources=BootstrapStaticResources(
            listeners=list(listeners), clusters=list(clusters), secrets=list(secrets)
        ),
    )


# --- output ---------------------------------------------------------------------------------------


# Field kinds for the walker (betterproto2's proto types, grouped by how proto-JSON writes them).
_INT64 = {
    betterproto2.TYPE_INT64,
    betterproto2.TYPE_UINT64,
    betterproto2.TYPE_SINT64,
    betterproto2.TYPE_FIXED64,
    betterproto2.TYPE_SFIXED64,
}
_Convert = Callable[[TAny], tuple[TAny, bool]]  # value -> (plain value, is the default)


def _scalar(proto_type: str, field_type: TAny, unwrap: Callable[[], type] | None) -> _Convert:
    """How proto-JSON writes one value of this field (betterproto2's ``_value_to_dict``)."""
    if proto_type == betterproto2.TYPE_MESSAGE:
        if unwrap is not None:  # google.protobuf wrappers and Duration, held as Python values
            wrapper: TAny = unwrap()
            return lambda v: (wrapper.from_wrapped(v).to_dict(), False)
        return lambda v: (_plain(v), False)
    if proto_type in _INT64:
        return lambda v: (str(v), not v)
    if proto_type == betterproto2.TYPE_BYTES:
        return lambda v: (base64.b64encode(v).decode("utf8"), not v)
    if proto_type == betterproto2.TYPE_ENUM:

        def enum(v: TAny) -> tuple[TAny, bool]:
            member = field_type(v)
            return (member.proto_name or member.name or member.value), not v

        return enum
    if proto_type in (betterproto2.TYPE_FLOAT, betterproto2.TYPE_DOUBLE):
        return lambda v: (_float(v), not v)
    return lambda v: (v, not v)


def _float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@functools.cache
def _plan(cls: type[betterproto2.Message]) -> tuple[tuple[str, str, str, _Convert, _Convert | None], ...]:
    """Per message class, once: (attribute, key, shape, value converter, map-key converter)."""
    hints: dict[str, TAny] = cls._type_hints()
    out: list[tuple[str, str, str, _Convert, _Convert | None]] = []
    for name, meta in cls._betterproto.meta_by_field_name.items():  # type: ignore[arg-type]
        key = name.rstrip("_")
        hint = hints[name]
        if meta.proto_type == betterproto2.TYPE_MAP:
            assert meta.map_meta is not None
            kmeta, vmeta = meta.map_meta
            out.append(
                (
                    name,
                    key,
                    "map",
                    _scalar(vmeta.proto_type, hint.__args__[1], vmeta.unwrap),
                    _scalar(kmeta.proto_type, hint.__args__[0], None),
                )
            )
        elif meta.repeated:
            out.append((name, key, "list", _scalar(meta.proto_type, hint.__args__[0], meta.unwrap), None))
        else:
            ftype = hint.__args__[0] if meta.optional else hint
            shape = "optional" if meta.optional else "single"
            out.append((name, key, shape, _scalar(meta.proto_type, ftype, meta.unwrap), None))
    return tuple(out)


def _plain(message: betterproto2.Message) -> TAny:
    """One message as proto-JSON with the proto field names, written straight from the dataclass.

    Gives what ``message.to_dict(casing=SNAKE)`` gives (same keys, same order, same defaults
    left out), but without serializing and re-parsing every ``Any`` (tests/controller compare it
    with betterproto2's own output).
    """
    cls = type(message)
    if cls is TypedAny:
        assert isinstance(message, TypedAny)
        inner = message.message
        body = _plain(inner)
        if type(inner).to_dict is betterproto2.Message.to_dict:
            return {"@type": message.type_url, **body}
        return {"@type": message.type_url, "value": body}
    if cls.to_dict is not betterproto2.Message.to_dict:
        # Well-known types with their own JSON form (Struct, Value, Duration, wrappers, Any).
        if cls is Any and not message.type_url:  # type: ignore[attr-defined]
            return {}  # Envoy's YAML loader wants an empty Any written as {}
        return message.to_dict(casing=betterproto2.Casing.SNAKE)
    out: dict[str, TAny] = {}
    for name, key, shape, convert, convert_key in _plan(cls):
        value = getattr(message, name)
        if shape == "list":
            if value:
                out[key] = [convert(v)[0] for v in value]
        elif shape == "map":
            if value:
                assert convert_key is not None
                out[key] = {convert_key(k)[0]: convert(v)[0] for k, v in value.items()}
        elif value is not None:
            plain, default = convert(value)
            if shape == "optional" or not default:
                out[key] = plain
    return out


def to_dict(message: betterproto2.Message) -> dict[str, TAny]:
    """The message as proto-JSON with the proto field names (Envoy's YAML form)."""
    out: dict[str, TAny] = _plain(message)
    return out


# libyaml's emitter when PyYAML has it (~10x faster on a 3 MB bootstrap; the same text).
_Dumper: TAny = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_TAG = "tag:yaml.org,2002:"
_FLOATS = yaml.representer.SafeRepresenter()


def _node(data: TAny) -> yaml.Node:
    """The YAML node ``yaml.safe_dump(..., default_flow_style=False)`` would build for ``data``.

    Built directly: PyYAML's representer (alias tracking, a type lookup per value) was most of
    the render time. Block style everywhere; a long multi-line string as a ``|`` literal.
    """
    kind = type(data)
    if kind is str:
        style = "|" if "\n" in data and len(data) > 80 else None
        return yaml.ScalarNode(_TAG + "str", data, style=style)
    if kind is dict:
        return yaml.MappingNode(
            _TAG + "map", [(_node(k), _node(v)) for k, v in data.items()], flow_style=False
        )
    if kind is list:
        return yaml.SequenceNode(_TAG + "seq", [_node(v) for v in data], flow_style=False)
    if kind is bool:
        return yaml.ScalarNode(_TAG + "bool", "true" if data else "false")
    if kind is int:
        return yaml.ScalarNode(_TAG + "int", str(data))
    if data is None:
        return yaml.ScalarNode(_TAG + "null", "null")
    if kind is float:
        node: yaml.Node = _FLOATS.represent_float(data)
        return node
    raise TypeError(f"cannot write {kind.__name__} as YAML")


def to_yaml(data: TAny) -> str:
    text: str = yaml.serialize(_node(data), Dumper=_Dumper, width=110)
    return text
