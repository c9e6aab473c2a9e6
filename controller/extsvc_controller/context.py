"""The translator's state: the snapshot indexed by kind and key, the clusters, the statuses."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from . import envoy, model
from .memo import BuildMemo
from .policies import Policy, policy_weight
from .results import Condition, Options, Snapshot, Status

# A Service port with one of these appProtocols gets an HTTP/2 cluster.
_H2 = {"http2", "grpc", "grpc-web", "kubernetes.io/h2c"}


class Context:
    """One translation's state: the snapshot's objects by kind and key, the policies (and which
    may target what), the clusters created so far and the status per object."""

    def __init__(self, snapshot: Snapshot, options: Options, memo: BuildMemo | None = None) -> None:
        self.options = options
        self.memo = memo
        self.statuses: dict[tuple[str, str, str], Status] = {}
        by: dict[str, dict[tuple[str, str], model.Object]] = defaultdict(dict)
        for obj in snapshot.objects:
            by[obj.kind][(obj.metadata.namespace, obj.metadata.name)] = obj
        classes = options.gateway_classes
        #: this controller's Gateways; the others (another GatewayClass) are left alone
        self.gateways: dict[tuple[str, str], model.Gateway] = {
            key: gw  # type: ignore[misc]
            for key, gw in by["Gateway"].items()
            if not classes or gw.spec.gateway_class_name in classes  # type: ignore[union-attr]
        }
        self.foreign_gateways = set(by["Gateway"]) - set(self.gateways)
        #: HTTPRoutes and GRPCRoutes (as routes), by (kind, namespace, name)
        self.routes: dict[tuple[str, str, str], model.HTTPRoute] = {
            ("HTTPRoute", *key): obj for key, obj in by["HTTPRoute"].items()  # type: ignore[misc]
        }
        for key, obj in by["GRPCRoute"].items():
            assert isinstance(obj, model.GRPCRoute)
            self.routes[("GRPCRoute", *key)] = obj.as_route()
        self.services: dict[tuple[str, str], model.Service] = by["Service"]  # type: ignore[assignment]
        self.secrets: dict[tuple[str, str], model.Secret] = by["Secret"]  # type: ignore[assignment]
        #: a Service's EndpointSlices, by (namespace, Service name)
        self.slices: dict[tuple[str, str], list[model.EndpointSlice]] = defaultdict(list)
        for key in sorted(by["EndpointSlice"]):
            eps = by["EndpointSlice"][key]
            assert isinstance(eps, model.EndpointSlice)
            service = eps.metadata.labels.get(model.SERVICE_NAME_LABEL)
            if service:
                self.slices[(eps.metadata.namespace, service)].append(eps)
        self.grants: list[model.ReferenceGrant] = list(by["ReferenceGrant"].values())  # type: ignore[arg-type]
        self.extensions: dict[tuple[str, str], model.GatewayExtension] = by["GatewayExtension"]  # type: ignore[assignment]
        self.clusters: dict[str, envoy.Cluster] = {}
        self._service_clusters: dict[tuple[str, str, int], tuple[str | None, str | None, bool]] = {}
        #: built once per translation and shared: a provider's HTTP filter by (filter name,
        #: cluster), and a scope's per-filter config by its winning policies (ids; the policies
        #: live as long as this context). At 1,000 routes building them again per policy and
        #: per rule was most of the translation.
        self.provider_filters: dict[tuple[str, str], envoy.HttpFilter] = {}
        self.per_filter_memo: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}
        self.policies: dict[tuple[str, str], Policy] = {}
        # Invalid GatewayExtensions by key: a policy using one says so, not "not found".
        self.invalid_extensions: dict[tuple[str, str], str] = {}
        for inv in snapshot.invalid:
            status = self.status(inv.kind, inv.namespace, inv.name)
            status.conditions.append(Condition("Accepted", "False", "Invalid", "; ".join(inv.errors)))
            if inv.kind == "GatewayExtension":
                self.invalid_extensions[(inv.namespace, inv.name)] = "; ".join(inv.errors)
            if inv.kind == "TrafficPolicy" and inv.targeting is not None:
                self.policies[(inv.namespace, inv.name)] = Policy(
                    inv.namespace, inv.name, 0, "", list(inv.errors), [], None, inv.targeting
                )
        for tp in by["TrafficPolicy"].values():
            assert isinstance(tp, model.TrafficPolicy)
            meta = tp.metadata
            self.policies[(meta.namespace, meta.name)] = Policy(
                meta.namespace,
                meta.name,
                policy_weight(meta),
                meta.creation_timestamp or "",
                [],
                [],
                tp.spec,
                tp.spec,
            )
        # Which policies may target an object, so that a route looks at its own policies only
        # (not at all of them: 1,000 routes x 1,000 policies was most of the translation time).
        self.by_target: dict[tuple[str, str, str], list[Policy]] = defaultdict(list)
        self.by_selector: dict[tuple[str, str], list[Policy]] = defaultdict(list)
        for key in sorted(self.policies):
            policy = self.policies[key]
            for ref in policy.targeting.target_refs or ():
                self.by_target[(ref.kind, policy.obj_ns, ref.name)].append(policy)
            for sel in policy.targeting.target_selectors or ():
                self.by_selector[(sel.kind, policy.obj_ns)].append(policy)

    def targeting(self, kind: str, ns: str, name: str) -> list[Policy]:
        """The policies with a targetRef to this object or a selector for its kind, each once
        (:func:`~.policies.matches` then says which, if any, target it and at which sections)."""
        found = {
            p.ref: p
            for p in (*self.by_target.get((kind, ns, name), ()), *self.by_selector.get((kind, ns), ()))
        }
        return list(found.values())

    def status(self, kind: str, ns: str, name: str) -> Status:
        key = (kind, ns, name)
        if key not in self.statuses:
            self.statuses[key] = Status(kind, ns, name)
        return self.statuses[key]

    # --- references ---------------------------------------------------------------------------

    def granted(
        self,
        from_kind: str,
        from_group: str,
        from_ns: str,
        to_kind: str,
        to_group: str,
        to_ns: str,
        to_name: str,
    ) -> bool:
        if from_ns == to_ns:
            return True
        for grant in self.grants:
            if grant.metadata.namespace != to_ns:
                continue
            if not any(
                f.kind == from_kind and f.group == from_group and f.namespace == from_ns
                for f in grant.spec.from_
            ):
                continue
            if any(
                t.kind == to_kind and t.group == to_group and t.name in (None, to_name) for t in grant.spec.to
            ):
                return True
        return False

    def service_cluster(self, ns: str, name: str, port: int) -> tuple[str | None, str | None, bool]:
        """(cluster name, error, http2) for one Service port; the cluster is created once, and
        the answer is remembered for the translation (thousands of routes name a few ports)."""
        key = (ns, name, port)
        known = self._service_clusters.get(key)
        if known is None:
            known = self._service_clusters[key] = self._service_cluster(ns, name, port)
        return known

    def _service_cluster(self, ns: str, name: str, port: int) -> tuple[str | None, str | None, bool]:
        svc = self.services.get((ns, name))
        if svc is None:
            return None, f"Service {ns}/{name} not found", False
        ports = [p for p in svc.spec.ports if p.port == port]
        if not ports:
            return None, f"Service {ns}/{name} has no port {port}", False
        http2 = (ports[0].app_protocol or "") in _H2
        cname = f"kube_{ns}_{name}_{port}"
        if cname not in self.clusters:
            endpoint = self.options.endpoints.get(f"{ns}/{name}:{port}") or self.options.endpoints.get(
                f"{ns}/{name}"
            )
            ready = self._ready_endpoints(ns, name, ports[0])
            if endpoint is not None:
                self.clusters[cname] = envoy.cluster(
                    cname, endpoint[0], endpoint[1], http2=http2, static=True
                )
            elif ready is not None:  # the Service's EndpointSlices: its ready Pods, by address
                self.clusters[cname] = envoy.static_cluster(cname, ready, http2=http2)
            else:
                host = f"{name}.{ns}.svc.{self.options.cluster_domain}"
                self.clusters[cname] = envoy.cluster(cname, host, port, http2=http2, static=False)
        return cname, None, http2

    def _ready_endpoints(
        self, ns: str, name: str, port: model.ServicePort
    ) -> list[tuple[str, int]] | None:
        """The ready addresses and target port of ``port`` in the Service's EndpointSlices; None
        without slices (or none for this port): the cluster resolves the Service's DNS name."""
        found: list[tuple[str, int]] | None = None
        for eps in self.slices.get((ns, name), ()):
            target = next(
                (p.port for p in eps.ports or () if (p.name or None) == (port.name or None) and p.port),
                None,
            )
            if target is None:
                continue
            found = found or []
            for ep in eps.endpoints:
                if ep.conditions.ready is not False:
                    found.extend((address, target) for address in ep.addresses)
        return sorted(set(found)) if found is not None else None
