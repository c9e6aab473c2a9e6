"""Typed Envoy config, built with envoy-data-plane (the only package that imports it).

envoy-data-plane's dataclasses check field names and types at construction and pack ``Any``
with the right type URL. They are for the controller only: the server's request path uses the
upb classes of xds-protos, which are several times faster.

Every builder here is pure: plain values in, a message out. Filter names and shapes follow
kgateway's scheme (docs/internals/kgateway-translation.md §3.1): one filter per provider, inserted
``disabled: true`` and
switched on per scope by ``typed_per_filter_config``.

The modules, by concern: ``names`` (filter names, metadata namespaces), ``packing`` (``Any``,
the GC pause), ``clusters`` (clusters, the providers' gRPC service), one module per filter family
(``ext_auth``, ``ext_proc``, ``ratelimit``; ``hcm`` for the connection manager, global-disable
and router filters), ``routes``, ``listeners`` (TLS, bootstrap) and ``output`` (dict, YAML).
This package re-exports what the translator and the renderer use.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import Route, RouteConfiguration, RouteMatch, VirtualHost
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from envoy_data_plane.google.protobuf import Any

from .clusters import cluster, grpc_service, static_cluster
from .ext_auth import ext_authz_filter, ext_authz_per_route
from .ext_proc import ext_proc_filter, ext_proc_per_route
from .hcm import disable_filter, http_connection_manager, router_filter
from .listeners import bootstrap, filter_chain, listener, tls_secret, tls_secret_files
from .names import (
    DISABLE_EXT_AUTH,
    DISABLE_EXT_AUTH_NS,
    DISABLE_EXT_PROC,
    DISABLE_EXT_PROC_NS,
    LOCAL_RATELIMIT,
    REPLACED_BODY,
    ROUTER,
)
from .output import to_dict, to_yaml
from .packing import TypedAny, enable, no_gc, pack
from .ratelimit import (
    local_ratelimit_filter,
    local_ratelimit_per_route,
    ratelimit_filter,
    ratelimit_per_route,
)
from .routes import (
    MERGE_ORIGIN,
    header_options,
    replaced_route,
    replaced_route_configuration,
    route,
    route_configuration,
    route_match,
    virtual_host,
)

__all__ = [
    "DISABLE_EXT_AUTH",
    "DISABLE_EXT_AUTH_NS",
    "DISABLE_EXT_PROC",
    "DISABLE_EXT_PROC_NS",
    "LOCAL_RATELIMIT",
    "MERGE_ORIGIN",
    "REPLACED_BODY",
    "ROUTER",
    "Any",
    "Bootstrap",
    "Cluster",
    "Filter",
    "FilterChain",
    "HttpFilter",
    "Listener",
    "Route",
    "RouteConfiguration",
    "RouteMatch",
    "Secret",
    "TypedAny",
    "VirtualHost",
    "bootstrap",
    "cluster",
    "disable_filter",
    "enable",
    "ext_authz_filter",
    "ext_authz_per_route",
    "ext_proc_filter",
    "ext_proc_per_route",
    "filter_chain",
    "grpc_service",
    "header_options",
    "http_connection_manager",
    "listener",
    "local_ratelimit_filter",
    "local_ratelimit_per_route",
    "no_gc",
    "pack",
    "ratelimit_filter",
    "ratelimit_per_route",
    "replaced_route",
    "replaced_route_configuration",
    "route",
    "route_configuration",
    "route_match",
    "router_filter",
    "static_cluster",
    "tls_secret",
    "tls_secret_files",
    "to_dict",
    "to_yaml",
    "virtual_host",
]
