"""``explain``: which filter runs for one route, at which scope, from which policy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from . import envoy
from .attach import Entry
from .policies import Provider
from .results import FilterUse, RouteExplain


def explain_route(
    e: Entry,
    rc_name: str,
    vh_name: str,
    envoy_route: str,
    route_explain: Mapping[str, tuple[str, str]],
    outer: tuple[Mapping[str, tuple[str, str]], Mapping[str, tuple[str, str]]],
    used: Mapping[str, Provider],
    disables: Iterable[str],
) -> RouteExplain:
    """The HCM's filters for one Envoy route: whether each runs, from which scope (Route,
    VirtualHost, RouteConfiguration: the more specific wins) and policy; or why it was replaced."""
    rule = e.route.spec.rules[e.rule_index]
    if "" in route_explain:  # the rule was replaced by a 500
        return RouteExplain(
            f"{e.route.metadata.namespace}/{e.route.metadata.name}",
            e.rule_index,
            rule.name,
            envoy_route,
            rc_name,
            vh_name,
            route_explain[""][1],
            (),
        )
    levels = [("Route", route_explain), ("VirtualHost", outer[1]), ("RouteConfiguration", outer[0])]
    effective: dict[str, tuple[str, str, str]] = {}
    for scope, entries in reversed(levels):
        for fname, (policy, settings) in entries.items():
            effective[fname] = (scope, policy, settings)  # the more specific scope wins
    chain: list[FilterUse] = []
    names = sorted(disables) + [p.name for p in sorted(used.values(), key=lambda p: p.sort_key)]
    if envoy.LOCAL_RATELIMIT in effective:
        names.append(envoy.LOCAL_RATELIMIT)
    auth_off = envoy.DISABLE_EXT_AUTH in effective
    proc_off = envoy.DISABLE_EXT_PROC in effective
    for fname in names:
        scope, policy, settings = effective.get(fname, ("", "", ""))
        runs = fname in effective
        if runs and fname.startswith("ext_auth/") and auth_off:
            runs, settings = False, f"skipped: extAuth disabled by {effective[envoy.DISABLE_EXT_AUTH][1]}"
        if runs and fname.startswith("ext_proc/") and proc_off:
            runs, settings = False, f"skipped: extProc disabled by {effective[envoy.DISABLE_EXT_PROC][1]}"
        chain.append(FilterUse(fname, runs, scope, policy, settings))
    chain.append(FilterUse(envoy.ROUTER, True, "", "", ""))
    return RouteExplain(
        f"{e.route.metadata.namespace}/{e.route.metadata.name}",
        e.rule_index,
        rule.name,
        envoy_route,
        rc_name,
        vh_name,
        None,
        tuple(chain),
    )
