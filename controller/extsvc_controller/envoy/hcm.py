"""The HTTP connection manager and its built-in filters (kgateway's global disable, the router)."""

from __future__ import annotations

from collections.abc import Sequence

from envoy_data_plane.envoy.config.listener.v3 import Filter
from envoy_data_plane.envoy.config.route.v3 import (
    RouteConfiguration,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.set_metadata import v3 as set_metadata
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.google.protobuf import Struct, Value

from .names import DISABLE_EXT_AUTH, DISABLE_EXT_AUTH_NS, DISABLE_EXT_PROC_NS, ROUTER
from .packing import pack


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
