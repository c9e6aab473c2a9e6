"""Prometheus metrics of the Kubernetes layer, on a registry the caller passes in.

No global registry: the controller exposes the one it owns, and tests (or several electors in one
process) each get their own. Labels are only values this code chooses (kind names, a fixed result
or reason set), never anything taken from a request or an object.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

_NS = "extsvc_controller"


class KubeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.objects = Gauge("kube_objects", "Objects held, per kind", ["kind"], namespace=_NS, registry=r)
        self.watch_restarts = Counter(
            "kube_watch_restarts", "Watches resumed after the server ended them", ["kind"],
            namespace=_NS, registry=r,
        )
        self.relists = Counter(
            "kube_relists", "Lists after the first one (410 Gone, resume impossible)", ["kind"],
            namespace=_NS, registry=r,
        )
        self.watch_errors = Counter(
            "kube_watch_errors", "Failed list or watch requests (retried with backoff)", ["kind"],
            namespace=_NS, registry=r,
        )
        self.objects_dropped = Counter(
            "kube_objects_dropped",
            "Objects not kept: reason=limit (per-kind cap), too_large (over the size cap)",
            ["kind", "reason"], namespace=_NS, registry=r,
        )
        self.status_writes = Counter(
            "status_writes", "Status subresource patches, result=ok|error", ["kind", "result"],
            namespace=_NS, registry=r,
        )
        self.status_skipped = Counter(
            "status_skipped_unchanged", "Statuses not written because they were unchanged", ["kind"],
            namespace=_NS, registry=r,
        )
        self.leader = Gauge(
            "leader", "1 while this replica holds the leader Lease", namespace=_NS, registry=r
        )
        self.leader_transitions = Counter(
            "leader_transitions", "Times this replica started or stopped leading", namespace=_NS, registry=r
        )
