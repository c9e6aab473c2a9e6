"""Route attachment: which HTTPRoute and GRPCRoute rules attach to which Gateway listener, with
which hostnames and backends."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from . import model
from .context import Context
from .model import GATEWAY_API


def host_matches(listener: str | None, host: str) -> bool:
    if listener is None:
        return True
    if listener.startswith("*."):
        return host.endswith(listener[1:]) or (host.startswith("*.") and host.endswith(listener[1:]))
    if host.startswith("*."):
        return listener.endswith(host[1:])
    return listener == host


def hostnames(listener: model.Listener, route: model.HTTPRoute) -> list[str]:
    if not route.spec.hostnames:
        return [listener.hostname or "*"]
    out = []
    for host in route.spec.hostnames:
        if host_matches(listener.hostname, host):
            # the more specific of the two
            if listener.hostname and host.startswith("*.") and not listener.hostname.startswith("*."):
                out.append(listener.hostname)
            else:
                out.append(host)
    return sorted(set(out))


def precedence(match: model.RouteMatch) -> tuple[int, int, int, int, int]:
    """Gateway API match precedence (higher first): exact path, prefix length, method, headers, query."""
    path = match.path or model.PathMatch()
    return (
        1 if path.type == "Exact" else 0,
        len(path.value) if path.type != "RegularExpression" else 0,
        1 if match.method else 0,
        len(match.headers),
        len(match.query_params),
    )


@dataclass(slots=True)
class Entry:
    """One match of one rule of an HTTPRoute, attached to one listener."""

    route: model.HTTPRoute
    rule_index: int
    match_index: int
    listener: model.Listener
    created: str


#: route key (kind, namespace, name) -> (parentRef, Gateway namespace, Gateway name, Accepted
#: reason), per parentRef.
RouteParents = dict[tuple[str, str, str], list[tuple[model.ParentReference, str, str, str]]]


def attach_routes(t: Context, gw_key: tuple[str, str], route_parents: RouteParents) -> dict[str, list[Entry]]:
    """Which route rules (one entry per match) attach to which of this Gateway's listeners.

    Records each parentRef to this Gateway, and whether a listener accepted it, in ``route_parents``.
    """
    gw = t.gateways[gw_key]
    attached: dict[str, list[Entry]] = defaultdict(list)
    for r_key in sorted(t.routes):
        route = t.routes[r_key]
        r_ns = r_key[1]
        for parent in route.spec.parent_refs:
            if (
                parent.kind != "Gateway"
                or (parent.namespace or r_ns) != gw_key[0]
                or parent.name != gw_key[1]
            ):
                continue
            listeners_for = [ln for ln in gw.spec.listeners if parent.section_name in (None, ln.name)]
            accepted_any = False
            for ln in listeners_for:
                allowed = ln.allowed_routes.namespaces.from_
                if allowed == "Same" and r_ns != gw_key[0]:
                    continue
                if allowed == "Selector":
                    continue
                if not hostnames(ln, route):
                    continue
                accepted_any = True
                for ri, rule in enumerate(route.spec.rules):
                    for mi in range(len(rule.matches)):
                        attached[ln.name].append(
                            Entry(route, ri, mi, ln, route.metadata.creation_timestamp or "")
                        )
            reason = "Accepted" if accepted_any else "NotAllowedByListeners"
            route_parents[r_key].append((parent, gw_key[0], gw_key[1], reason))
    return attached


def route_refs(t: Context, r_key: tuple[str, str, str]) -> bool:
    """Whether every backendRef of the route resolves."""
    ok = True
    route = t.routes[r_key]
    for rule in route.spec.rules:
        for b in rule.backend_refs:
            if backend(t, route, b)[1] is not None:
                ok = False
    return ok


def backend(t: Context, route: model.HTTPRoute, b: model.BackendRef) -> tuple[str | None, str | None]:
    """(cluster name, error) for one backendRef of ``route``."""
    if b.kind != "Service" or b.group != "":
        return None, f"unsupported backend kind {b.kind}"
    ns = route.metadata.namespace
    bns = b.namespace or ns
    if not t.granted(route.kind, GATEWAY_API, ns, "Service", "", bns, b.name):
        return None, f"backendRef {bns}/{b.name}: missing reference grant"
    if b.port is None:
        return None, f"backendRef {bns}/{b.name}: port is required"
    cname, error, _ = t.service_cluster(bns, b.name, b.port)
    return cname, error
