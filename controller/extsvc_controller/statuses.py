"""Statuses: Gateway, HTTPRoute and TrafficPolicy conditions once everything is translated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import model
from .attach import Entry, RouteParents, route_refs
from .context import Context
from .results import Ancestor, Condition, ListenerStatus, Status


def gateway_status(gw: model.Gateway, gw_status: Status, gw_conditions: Sequence[Condition]) -> None:
    """Accepted (or the listener and certificate problems) first, then Programmed; what the HCMs
    added meanwhile (replaced scopes, hostname conflicts) stays between them."""
    gw_status.conditions[:0] = [*gw_conditions] or [Condition("Accepted", "True", "Accepted")]
    gw_status.conditions.append(Condition("Programmed", "True", "Programmed"))
    selectors = sorted(
        ln.name for ln in gw.spec.listeners if ln.allowed_routes.namespaces.from_ == "Selector"
    )
    if selectors:
        # Not evaluated (no Namespace objects in the snapshot): say so; no route attaches there.
        gw_status.conditions.append(
            Condition(
                "extsvc.dev/Supported",
                "False",
                "UnsupportedValue",
                f"listener(s) {', '.join(selectors)}: allowedRoutes.namespaces.from Selector is not "
                "supported by extsvc-controller; no HTTPRoute attaches there",
            )
        )


#: the route kinds an HTTP or HTTPS listener takes
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


def listener_statuses(
    gw: model.Gateway, gw_status: Status, attached: Mapping[str, Sequence[Entry]]
) -> None:
    """Per listener: the routes attached and its conditions (Accepted, Conflicted, ResolvedRefs,
    Programmed), from what the translation said about the Gateway's listeners."""
    for ln in gw.spec.listeners:
        mine = [c for c in gw_status.conditions if c.message.startswith(f"listener {ln.name}: ")]

        def about(reason: str, found: Sequence[Condition] = mine) -> str:
            return "; ".join(c.message.split(": ", 1)[1] for c in found if c.reason == reason)

        port_conflict = any(
            c.reason == "ListenersNotValid" and c.message.startswith(f"port {ln.port}: ")
            for c in gw_status.conditions
        )
        bad_refs, hostnames, replaced = (
            about("InvalidCertificateRef"), about("HostnameConflict"), about("ListenerReplaced")
        )
        accepted = Condition("Accepted", "True", "Accepted")
        conflicted = Condition("Conflicted", "False", "NoConflicts")
        if port_conflict:
            why = f"port {ln.port}: conflicting listeners"
            accepted = Condition("Accepted", "False", "PortUnavailable", why)
            conflicted = Condition("Conflicted", "True", "ProtocolConflict")
        elif hostnames:
            conflicted = Condition("Conflicted", "True", "HostnameConflict", hostnames)
        refs = Condition("ResolvedRefs", "False", "InvalidCertificateRef", bad_refs) if bad_refs \
            else Condition("ResolvedRefs", "True", "ResolvedRefs")
        problem = "; ".join(filter(None, (bad_refs, replaced)))
        programmed = Condition("Programmed", "True", "Programmed")
        if port_conflict or problem:
            programmed = Condition("Programmed", "False", "Invalid", problem or "the listener is not created")
        routes = {
            (e.route.kind, e.route.metadata.namespace, e.route.metadata.name)
            for e in attached.get(ln.name, ())
        }
        gw_status.listeners.append(
            ListenerStatus(ln.name, len(routes), ROUTE_KINDS, (accepted, conflicted, refs, programmed))
        )


def route_statuses(
    t: Context,
    route_parents: RouteParents,
    route_replaced: Mapping[tuple[str, str, str], Mapping[int, str]],
) -> None:
    """Per HTTPRoute and GRPCRoute: Accepted per parentRef, ResolvedRefs, and the rules replaced
    by a 500."""
    for r_key in sorted(t.routes):
        if not route_parents.get(r_key) and _foreign_only(t, r_key):
            continue  # attached to another controller's Gateways only: not ours to report on
        st = t.status(*r_key)
        for parent, gns, gname, reason in route_parents.get(r_key, []):
            st.conditions.append(
                Condition(
                    "Accepted",
                    "True" if reason == "Accepted" else "False",
                    reason,
                    f"parent {gns}/{gname}" + (f"/{parent.section_name}" if parent.section_name else ""),
                )
            )
        if not route_parents.get(r_key):
            st.conditions.append(
                Condition("Accepted", "False", "NoMatchingParent", "no parent Gateway found")
            )
        refs_ok = route_refs(t, r_key)
        st.conditions.append(
            Condition(
                "ResolvedRefs",
                "True" if refs_ok else "False",
                "ResolvedRefs" if refs_ok else "BackendNotFound",
            )
        )
        replaced = route_replaced.get(r_key)
        if replaced:
            st.conditions.append(
                Condition(
                    "kgateway.dev/Programmed",
                    "False",
                    "RouteRuleReplaced",
                    "; ".join(f"Replaced Rule ({i}): {msg}" for i, msg in sorted(replaced.items())),
                )
            )


def policy_statuses(t: Context) -> None:
    """Per TrafficPolicy: Accepted and Attached, per Gateway it attached to (its ancestors)."""
    for key in sorted(t.policies):
        p = t.policies[key]
        st = t.status("TrafficPolicy", *key)
        if p.errors:
            accepted = Condition("Accepted", "False", "Invalid", "; ".join(p.errors))
            attached = Condition("Attached", "False", "Pending")
        else:
            accepted = Condition("Accepted", "True", "Valid", "Policy accepted")
            if p.overridden:
                attached = Condition(
                    "Attached",
                    "False",
                    "Overridden",
                    "Overridden due to conflict with higher priority policy in target(s)",
                )
            elif p.merged:
                attached = Condition(
                    "Attached", "True", "Merged", "Merged with other policies in target(s) and attached"
                )
            elif p.attached:
                attached = Condition("Attached", "True", "Attached", "Attached to all targets")
            else:
                attached = Condition("Attached", "False", "Pending", "no target found")
        conditions = [accepted, attached]
        # Sections accepted but not enforced (the rejected security ones are in Accepted above).
        ignored = [n for n in p.spec.unsupported if n not in p.spec.unenforceable] if p.spec else []
        if ignored:
            conditions.append(
                Condition(
                    "extsvc.dev/Supported",
                    "False",
                    "UnsupportedField",
                    "not translated by extsvc-controller (NOT enforced): " + ", ".join(ignored),
                )
            )
        st.warnings.extend(p.warnings)
        if p.attached:
            st.ancestors = [Ancestor(ns, name, tuple(conditions)) for ns, name in sorted(p.attached)]
            st.conditions = (
                [c for c in st.conditions if c.type != "Accepted"] if not p.errors else st.conditions[:0]
            )
        else:
            st.conditions = conditions


def _foreign_only(t: Context, r_key: tuple[str, str, str]) -> bool:
    """Whether every parentRef of the route names a Gateway of another GatewayClass."""
    route = t.routes[r_key]
    parents = [(p.namespace or r_key[1], p.name) for p in route.spec.parent_refs if p.kind == "Gateway"]
    return bool(parents) and all(key in t.foreign_gateways for key in parents)
