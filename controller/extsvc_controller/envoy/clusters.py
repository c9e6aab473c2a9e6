"""Clusters (one per Service port) and the gRPC service every provider filter calls."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any as TAny

from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterDnsLookupFamily
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    BackoffStrategy,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    RetryPolicy,
    SocketAddress,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)

from extsvc.protocol_names import AUTHORITY_METADATA_KEY

from .. import model
from .packing import pack


def cluster(name: str, host: str, port: int, *, http2: bool, static: bool) -> Cluster:
    """A cluster for one Service port; STATIC for an IP (``--endpoints``), STRICT_DNS otherwise."""
    built = static_cluster(name, [(host, port)], http2=http2)
    if not static:
        built.type = ClusterDiscoveryType.STRICT_DNS
        built.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    return built


def static_cluster(name: str, endpoints: Sequence[tuple[str, int]], *, http2: bool) -> Cluster:
    """A STATIC cluster of addresses (a Service's EndpointSlices; over xDS, sent as EDS)."""
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
        type=ClusterDiscoveryType.STATIC,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO,
        connect_timeout=timedelta(seconds=5),
        typed_extension_protocol_options=options,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(endpoint=Endpoint(address=address(host, port)))
                        for host, port in endpoints
                    ]
                )
            ],
        ),
    )


def _http2_options() -> TAny:
    from envoy_data_plane.envoy.config.core.v3 import Http2ProtocolOptions

    return Http2ProtocolOptions()


def address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


# --- gRPC services of the providers (GatewayExtension) ---------------------------------------------


def retry_policy(retry: model.ExtSvcRetry | None) -> RetryPolicy | None:
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
        retry_policy=retry_policy(svc.retry),
        # extsvc reads the policy name from this gRPC metadata while grpcio cannot read :authority
        # (docs/operators.md, "Choosing the policy for a request"); the server defines its name.
        initial_metadata=[HeaderValue(key=AUTHORITY_METADATA_KEY, value=authority)] if authority else [],
    )
