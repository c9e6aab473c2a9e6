"""One HTTP connection manager: its RouteConfiguration, per-scope filter config and filter list."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from . import envoy, model
from .attach import Entry, backend, hostnames, precedence
from .context import Context
from .explain import explain_route
from .model import KGATEWAY
from .policies import FIELDS, STAGES, Policy, Provider, matches, merge, per_filter
from .results import Condition, RouteExplain, Status

#: What a scope's ``note`` call records: (per-filter config, winning policy per field).
Note = Callable[[Mapping[str, envoy.Any], Mapping[str, Policy]], None]
#: A route waiting for its explain data: (entry, vhost, Envoy route, its explain, its vhost's).
_Pending = tuple[Entry, str, str, dict[str, tuple[str, str]], dict[str, tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class GatewayScope:
    """What every HCM of one Gateway shares: the Gateway and its policies, the routes attached to
    its listeners, and where the results go (its status, the explain data, the replaced rules)."""

    t: Context
    key: tuple[str, str]  # (namespace, name) of the Gateway
    status: Status
    policies: Sequence[Policy]  # the TrafficPolicies that target the Gateway (or its listeners)
    attached: Mapping[str, Sequence[Entry]]  # listener name -> the route entries attached there
    explains: list[RouteExplain]  # out: one per Envoy route
    route_replaced: dict[tuple[str, str, str], dict[int, str]]  # out: route key -> rule -> why

    def section(self, ln: model.Listener) -> list[tuple[int, Policy]]:
        """The Gateway's policies that target this listener by sectionName (precedence 1)."""
        labels = self.t.gateways[self.key].metadata.labels
        return [(1, p) for p in self.policies if ln.name in matches(p, "Gateway", *self.key, labels)]

    def whole(self) -> list[tuple[int, Policy]]:
        """The Gateway's policies that target all of it (precedence 0)."""
        labels = self.t.gateways[self.key].metadata.labels
        return [(0, p) for p in self.policies if None in matches(p, "Gateway", *self.key, labels)]


@dataclass(slots=True)
class _Filters:
    """One HCM's filters as its scopes use them: the providers some scope enables and the
    global-disable filters some scope switches on."""

    gw_key: tuple[str, str]
    used: dict[str, Provider] = field(default_factory=dict)
    disables: set[str] = field(default_factory=set)

    def note(self, cfg: Mapping[str, envoy.Any], winners: Mapping[str, Policy]) -> None:
        for field_name, policy in winners.items():
            policy.attached.add(self.gw_key)
            if field_name in policy.providers:
                self.used[policy.providers[field_name].name] = policy.providers[field_name]
        for name in cfg:
            if name.startswith("global_disable/"):
                self.disables.add(name)

    def http_filters(self, rc: envoy.RouteConfiguration) -> list[envoy.HttpFilter]:
        """The HCM's filter list: global disables, the providers in kgateway's order, the router."""
        filters = [envoy.disable_filter(n) for n in sorted(self.disables)]
        filters += [p.filter for p in sorted(self.used.values(), key=lambda p: p.sort_key)]
        if envoy.LOCAL_RATELIMIT in _local_users(rc):
            # ratelimit/local sorts by name among the During-RateLimit filters
            # (docs/internals/kgateway-translation.md §3.2).
            filters.append(envoy.local_ratelimit_filter())
            filters = _sort_filters(filters, self.used)
        filters.append(envoy.router_filter())
        return filters


def _invalid(policies: Sequence[Policy]) -> str:
    return "; ".join(f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in policies)


def chain(scope: GatewayScope, rc_name: str, group: Sequence[model.Listener], *, https: bool) -> envoy.Filter:
    """One HCM: its RouteConfiguration (vhosts, routes, per-scope config) and its filter list."""
    filters = _Filters(scope.key)
    # RouteConfiguration scope: the whole Gateway (HTTPS: merged with the listener, which wins).
    rc_scope = scope.whole() + (scope.section(group[0]) if https else [])
    rc_winners, rc_invalid = merge(rc_scope)
    rc_cfg, rc_origins, rc_explain = scoped_config(scope.t, rc_winners)
    for _, p in rc_scope:
        p.attached.add(scope.key)
    if rc_invalid:
        reason = (
            "ListenerReplaced"
            if https and any(p in [q for _, q in scope.section(group[0])] for p in rc_invalid)
            else "GatewayReplaced"
        )
        scope.status.conditions.append(Condition("Accepted", "False", reason, _invalid(rc_invalid)))
        rc = envoy.replaced_route_configuration(rc_name)
        return envoy.http_connection_manager(rc, [envoy.router_filter()])
    filters.note(rc_cfg, rc_winners)

    vhosts: list[envoy.VirtualHost] = []
    pending: list[_Pending] = []
    seen_domains: set[str] = set()
    for ln in sorted(group, key=lambda x: x.name):
        vhosts += _virtual_hosts(
            scope, ln, [] if https else scope.section(ln), filters, seen_domains, pending
        )
    # Explain once the HCM's filter list is complete.
    for e, vh_name, rname, rv_explain, vh_explain in pending:
        scope.explains.append(
            explain_route(
                e,
                rc_name,
                vh_name,
                rname,
                rv_explain,
                (rc_explain, vh_explain),
                filters.used,
                filters.disables,
            )
        )
    rc = envoy.route_configuration(rc_name, vhosts, rc_cfg, rc_origins)
    return envoy.http_connection_manager(rc, filters.http_filters(rc))


def _virtual_hosts(
    scope: GatewayScope,
    ln: model.Listener,
    vh_scope: list[tuple[int, Policy]],
    filters: _Filters,
    seen_domains: set[str],
    pending: list[_Pending],
) -> list[envoy.VirtualHost]:
    """A listener's virtual hosts, one per hostname of its routes; VirtualHost-scope config from
    the policies in ``vh_scope``. A hostname an earlier listener has is a conflict."""
    by_host: dict[str, list[Entry]] = defaultdict(list)
    for e in scope.attached.get(ln.name, []):
        for host in hostnames(ln, e.route):
            by_host[host].append(e)
    if not by_host and ln.hostname:
        by_host[ln.hostname] = []
    vh_winners, vh_invalid = merge(vh_scope)
    for _, p in vh_scope:
        p.attached.add(scope.key)
    vh_cfg, vh_origins, vh_explain = scoped_config(scope.t, vh_winners)
    if vh_invalid:
        scope.status.conditions.append(
            Condition("Accepted", "False", "ListenerReplaced", f"listener {ln.name}: " + _invalid(vh_invalid))
        )
    else:
        filters.note(vh_cfg, vh_winners)
    vhosts: list[envoy.VirtualHost] = []
    for host in sorted(by_host):
        if host in seen_domains:
            scope.status.conditions.append(
                Condition(
                    "Accepted",
                    "False",
                    "HostnameConflict",
                    f"listener {ln.name}: hostname {host} already used",
                )
            )
            continue
        seen_domains.add(host)
        vh_name = f"listener~{ln.port}~{_sanitize(host)}"
        routes: list[envoy.Route] = []
        for e in sorted(by_host[host], key=_route_order):
            r, rv_explain = _route(scope, e, vh_invalid, filters.note)
            routes.append(r)
            if rv_explain is not None and scope.t.options.explain:
                pending.append((e, vh_name, r.name, rv_explain, vh_explain))
        vhosts.append(
            envoy.virtual_host(
                vh_name, [host], routes, {} if vh_invalid else vh_cfg, {} if vh_invalid else vh_origins
            )
        )
    return vhosts


def _route_order(e: Entry) -> tuple[tuple[int, ...], str, str, str, int, int]:
    """Gateway API order: match precedence, then the oldest route, then namespace/name, rule, match."""
    return (
        tuple(-x for x in precedence(e.route.spec.rules[e.rule_index].matches[e.match_index])),
        e.created,
        e.route.metadata.namespace,
        e.route.metadata.name,
        e.rule_index,
        e.match_index,
    )


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("*", "wildcard"))


def _local_users(rc: envoy.RouteConfiguration) -> set[str]:
    names = set(rc.typed_per_filter_config)
    for vh in rc.virtual_hosts:
        names |= set(vh.typed_per_filter_config)
        for r in vh.routes:
            names |= set(r.typed_per_filter_config)
    return names


def _sort_filters(filters: list[envoy.HttpFilter], used: Mapping[str, Provider]) -> list[envoy.HttpFilter]:
    def key(f: envoy.HttpFilter) -> tuple[int, int, int, str]:
        if f.name.startswith("global_disable/"):
            return (-1, 0, 0, f.name)
        if f.name == envoy.LOCAL_RATELIMIT:
            return (STAGES["RateLimit"] * 3, 2, 0, f.name)
        return used[f.name].sort_key

    return sorted(filters, key=key)


def _route(
    scope: GatewayScope, e: Entry, vh_invalid: list[Policy], note: Note
) -> tuple[envoy.Route, dict[str, tuple[str, str]] | None]:
    """One Envoy route for one rule match, with its route-scope policies; a 500 if one is invalid."""
    t = scope.t
    route = e.route
    ns, name = route.metadata.namespace, route.metadata.name
    rule = route.spec.rules[e.rule_index]
    kind = "grpc-" if route.kind == "GRPCRoute" else ""  # an HTTPRoute may have the same name
    rname = f"{kind}{ns}-{name}-rule-{e.rule_index}-match-{e.match_index}"
    # Route-scope policies: ExtensionRef > targetRef with sectionName > whole route
    # (docs/internals/kgateway-translation.md §3.6).
    policies: list[tuple[int, Policy]] = []
    problems: list[str] = []
    for p in t.targeting(route.kind, ns, name):
        for section in matches(p, route.kind, ns, name, route.metadata.labels):
            if section is None:
                policies.append((0, p))
            elif section == rule.name:
                policies.append((1, p))
    for flt in rule.filters:
        if flt.type == "ExtensionRef" and flt.extension_ref is not None:
            ref = flt.extension_ref
            if ref.group != KGATEWAY or ref.kind != "TrafficPolicy":
                problems.append(f"{ref.group}/{ref.kind}/{ns}/{ref.name}: unsupported extensionRef kind")
                continue
            policy = t.policies.get((ns, ref.name))
            if policy is None:
                problems.append(f"{KGATEWAY}/TrafficPolicy/{ns}/{ref.name}: policy not found")
            else:
                policies.append((2, policy))
        elif flt.type not in ("ExtensionRef", "RequestHeaderModifier"):
            problems.append(f"filter type {flt.type} is not supported by extsvc-controller")
    winners, invalid = merge(policies)
    problems += [f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in invalid]
    if vh_invalid:
        problems += [f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in vh_invalid]
    if policies:
        gws = {(pr.namespace or ns, pr.name) for pr in route.spec.parent_refs}
        gws = {g for g in gws if g in t.gateways}
        for _, p in policies:
            p.attached |= gws
    if problems:
        scope.route_replaced[(route.kind, ns, name)][e.rule_index] = "; ".join(problems)
        match = _route_match(t, rule.matches[e.match_index])
        return envoy.replaced_route(rname, match), {"": ("", "; ".join(problems))}
    clusters: list[tuple[str, int]] = []
    for b in rule.backend_refs:
        cname, _ = backend(t, route, b)
        if cname is not None and b.weight > 0:
            clusters.append((cname, b.weight))
    # The same route object, rule, clusters and winning policy objects as in an earlier
    # translation build the same Envoy route (see .memo): reuse it.
    key: tuple[object, ...] | None = None
    if t.memo is not None:
        key = (rname, id(route), e.rule_index, e.match_index, tuple(clusters), _winners_key(winners))
        hit = t.memo.routes.get(key)
        if hit is not None:
            built, cfg, explain = hit[:3]
            note(cfg, winners)
            return built, dict(explain)
    cfg, origins, explain = scoped_config(t, winners)
    note(cfg, winners)
    modifier = next(
        (f.request_header_modifier for f in rule.filters if f.type == "RequestHeaderModifier"), None
    )
    match = _route_match(t, rule.matches[e.match_index])  # only for a route not built before
    built = envoy.route(rname, match, clusters, cfg, envoy.header_options(modifier), origins)
    if key is not None and t.memo is not None:
        # the objects the key names by id stay alive with the entry
        t.memo.routes.put(key, (built, cfg, dict(explain), route, [p.spec for p in winners.values()]))
    return built, explain


def _winners_key(winners: Mapping[str, Policy]) -> tuple[object, ...]:
    return tuple((name, p.memo_key()) for name, p in sorted(winners.items()))


def scoped_config(
    t: Context, winners: Mapping[str, Policy]
) -> tuple[dict[str, envoy.Any], dict[str, list[str]], dict[str, tuple[str, str]]]:
    """:func:`~.policies.per_filter`, once per set of winning policies in a translation (the rules
    of a route, and routes with the same policies, share it); each caller gets its own dicts."""
    key = tuple(id(winners.get(name)) for name in FIELDS)
    found = t.per_filter_memo.get(key)
    if found is None:
        found = t.per_filter_memo[key] = per_filter(winners)
    config, origins, explain = found
    return dict(config), {k: list(v) for k, v in origins.items()}, dict(explain)


def _route_match(t: Context, match: model.RouteMatch) -> envoy.RouteMatch:
    """Envoy's match for a rule match, once across builds for the same match object."""
    if t.memo is None:
        return envoy.route_match(match)
    key = ("match", id(match))
    hit = t.memo.routes.get(key)
    if hit is None or hit[0] is not match:
        hit = (match, envoy.route_match(match))
        t.memo.routes.put(key, hit)
    built: envoy.RouteMatch = hit[1]
    return built
