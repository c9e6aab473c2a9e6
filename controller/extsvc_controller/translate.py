"""The translator: a snapshot of resources in, Envoy config and a status per object out.

PURE: no I/O, no clock, no randomness; the same snapshot gives byte-identical output. It follows
kgateway's scheme (docs/internals/kgateway-translation.md §3): a filter per provider
(``ext_auth/<ns>/<name>``, ``ext_proc/<ns>/<name>``, ``ratelimit/<ns>/<name>``, ``ratelimit/local``)
inserted disabled and enabled per scope; ``disable: {}`` through the set_metadata
``global_disable/*`` filters; per-filter config at RouteConfiguration / VirtualHost / Route scope
by attachment level (docs/internals/kgateway-translation.md §3.4); precedence and shallow merge per field
(docs/internals/kgateway-translation.md §3.6); an invalid policy replaces what it is attached to with a 500
(docs/internals/kgateway-translation.md §3.7: fail closed, never open).

This module runs the steps; each lives in its own module: ``context`` (the snapshot indexed, the
references and clusters), ``policies`` (targeting, precedence, merge, per-filter config),
``providers`` (GatewayExtensions), ``attach`` (routes to listeners, hostnames, backends),
``listeners`` (ports, TLS), ``chains`` (one HCM: vhosts, routes, filter list), ``explain`` and
``statuses``; ``results`` holds the types in and out.
"""

from __future__ import annotations

from collections import defaultdict

from . import envoy
from .attach import RouteParents, attach_routes
from .chains import GatewayScope
from .context import Context
from .listeners import Resources, gateway_listeners
from .memo import BuildMemo
from .policies import matches
from .providers import construct
from .results import (
    Ancestor,
    Condition,
    FilterUse,
    Invalid,
    Options,
    RouteExplain,
    Snapshot,
    Status,
    Translation,
)
from .statuses import gateway_status, listener_statuses, policy_statuses, route_statuses

__all__ = [
    "Ancestor",
    "Condition",
    "FilterUse",
    "Invalid",
    "Options",
    "RouteExplain",
    "Snapshot",
    "Status",
    "Translation",
    "translate",
]


def translate(
    snapshot: Snapshot, options: Options | None = None, memo: BuildMemo | None = None
) -> Translation:
    """Translate ``snapshot`` into an Envoy bootstrap, a status per object and the explain data.

    ``memo`` (the live controller's): reuse the routes an earlier translation built from the same
    objects (:mod:`.memo`); the output is the same as without it.
    """
    with envoy.no_gc():
        return _translate(snapshot, options, memo)


def _translate(snapshot: Snapshot, options: Options | None, memo: BuildMemo | None) -> Translation:
    t = Context(snapshot, options or Options(), memo)
    construct(t)
    out = Resources()
    explains: list[RouteExplain] = []
    route_replaced: dict[tuple[str, str, str], dict[int, str]] = defaultdict(dict)
    route_parents: RouteParents = defaultdict(list)
    for gw_key in sorted(t.gateways):
        gw = t.gateways[gw_key]
        gw_status = t.status("Gateway", *gw_key)
        gw_policies = [
            p
            for p in t.targeting("Gateway", *gw_key)
            if matches(p, "Gateway", gw_key[0], gw_key[1], gw.metadata.labels)
        ]
        attached = attach_routes(t, gw_key, route_parents)
        scope = GatewayScope(t, gw_key, gw_status, gw_policies, attached, explains, route_replaced)
        gw_conditions = gateway_listeners(scope, out)
        gateway_status(gw, gw_status, gw_conditions)
        listener_statuses(gw, gw_status, attached)
    route_statuses(t, route_parents, route_replaced)
    policy_statuses(t)
    cluster_list = [t.clusters[k] for k in sorted(t.clusters)]
    secrets = [out.secrets[k] for k in sorted(out.secrets)]
    boot = envoy.bootstrap(t.options.admin, out.listeners, cluster_list, secrets)
    statuses = tuple(t.statuses[k] for k in sorted(t.statuses))
    gateways = tuple((key, tuple(out.by_gateway.get(key, ()))) for key in sorted(t.gateways))
    return Translation(boot, statuses, tuple(explains), tuple(sorted(out.files.items())), gateways)
