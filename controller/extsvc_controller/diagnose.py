"""Why ``explain`` has nothing to show for an HTTPRoute: read from the snapshot and the statuses.

Pure, like the translator: a snapshot and its translation in, one line of text out.
"""

from __future__ import annotations

from . import model
from .translate import Snapshot, Status, Translation

__all__ = ["not_programmed"]

# What a Gateway condition means for the routes on it.
_EFFECT = {
    "GatewayReplaced": "every route of the Gateway answers 500",
    "ListenerReplaced": "the listener's routes answer 500",
    "ListenersNotValid": "the listener is not created",
    "HostnameConflict": "the routes of that hostname are left out",
    "InvalidCertificateRef": "an HTTPS listener without a usable certificate is left out",
}


def _invalid(snapshot: Snapshot, kind: str, ns: str, name: str) -> str | None:
    for inv in snapshot.invalid:
        if (inv.kind, inv.namespace, inv.name) == (kind, ns, name):
            return "; ".join(inv.errors)
    return None


def _rules(route: model.HTTPRoute) -> str:
    return ", ".join(str(i) + (f" ({r.name})" if r.name else "") for i, r in enumerate(route.spec.rules))


def not_programmed(
    snapshot: Snapshot, translation: Translation, ns: str, name: str, rule: str | None = None
) -> str:
    """One line: why HTTPRoute ``ns/name`` (rule ``rule``: its name or index) has no Envoy route."""
    routes = {
        (o.metadata.namespace, o.metadata.name): o for o in snapshot.objects if isinstance(o, model.HTTPRoute)
    }
    route = routes.get((ns, name))
    if route is None:
        errors = _invalid(snapshot, "HTTPRoute", ns, name)
        if errors is not None:
            return f"HTTPRoute {ns}/{name} is invalid: {errors}"
        elsewhere = sorted(f"{k[0]}/{k[1]}" for k in routes if k[1] == name)
        hint = f" (found: {', '.join(elsewhere)})" if elsewhere else ""
        return f"no HTTPRoute {ns}/{name} in the manifests{hint}"
    if rule is not None and not any(rule in (r.name, str(i)) for i, r in enumerate(route.spec.rules)):
        return f"HTTPRoute {ns}/{name} has no rule {rule} (rules: {_rules(route)})"

    statuses: dict[tuple[str, str, str], Status] = {
        (s.kind, s.namespace, s.name): s for s in translation.statuses
    }
    reasons: list[str] = []
    route_status = statuses.get(("HTTPRoute", ns, name))
    for c in route_status.conditions if route_status else ():
        if c.type == "Accepted" and c.status == "False":
            reasons.append(f"{c.reason}: {c.message}" if c.message else c.reason)
    gateways = {
        (o.metadata.namespace, o.metadata.name) for o in snapshot.objects if isinstance(o, model.Gateway)
    }
    parents = sorted({(p.namespace or ns, p.name) for p in route.spec.parent_refs if p.kind == "Gateway"})
    for gns, gname in parents:
        if (gns, gname) not in gateways:
            errors = _invalid(snapshot, "Gateway", gns, gname)
            reasons.append(
                f"Gateway {gns}/{gname} is invalid: {errors}"
                if errors is not None
                else f"parent Gateway {gns}/{gname} not found"
            )
            continue
        seen: set[tuple[str, str, str]] = set()
        gw_status = statuses.get(("Gateway", gns, gname))
        for c in gw_status.conditions if gw_status else ():
            if c.status != "False" or (c.type, c.reason, c.message) in seen:
                continue
            seen.add((c.type, c.reason, c.message))
            effect = f" ({_EFFECT[c.reason]})" if c.reason in _EFFECT else ""
            what = "was not accepted" if c.type == "Accepted" else f"has {c.type}=False"
            reasons.append(f"Gateway {gns}/{gname} {what}: {c.reason}: {c.message}{effect}")
    if not reasons:
        reasons.append("no listener of its parent Gateways took it")
    what = f"HTTPRoute {ns}/{name}" + (f" rule {rule}" if rule is not None else "")
    return f"{what} is not programmed: " + "; ".join(reasons)
