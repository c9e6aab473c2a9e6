"""RouteConfiguration, virtual hosts, routes and matches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any as TAny

from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
)
from envoy_data_plane.envoy.config.core.v3 import Metadata as CoreMetadata
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    QueryParameterMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    RegexMatcher,
    StringMatcher,
)
from envoy_data_plane.google.protobuf import Any, Struct, Value

from .. import model
from .names import REPLACED_BODY


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
    headers = [HeaderMatcher(name=h.name, string_match=_string_match(h.type, h.value))
               for h in match.headers]
    if match.method:
        headers.append(HeaderMatcher(name=":method", string_match=StringMatcher(exact=match.method)))
    query = [QueryParameterMatcher(name=q.name, string_match=_string_match(q.type, q.value))
             for q in match.query_params]
    return RouteMatch(headers=headers, query_parameters=query, **kwargs)


def _string_match(kind: str, value: str) -> StringMatcher:
    """Gateway API's ``Exact`` as an exact match, anything else (``RegularExpression``) as RE2."""
    if kind == "Exact":
        return StringMatcher(exact=value)
    return StringMatcher(safe_regex=RegexMatcher(regex=value))


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
