"""What the translator takes and gives: the snapshot, options, statuses and explain data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import envoy, model


@dataclass(frozen=True, slots=True)
class Invalid:
    """A manifest that failed schema/CEL validation; TrafficPolicies keep their targeting."""

    kind: str
    namespace: str
    name: str
    errors: tuple[str, ...]
    targeting: model.Targeting | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    objects: tuple[model.Object, ...]
    invalid: tuple[Invalid, ...] = ()


@dataclass(frozen=True, slots=True)
class Options:
    """:param endpoints: ``ns/name`` or ``ns/name:port`` -> (host, port), for local runs.
    :param listeners: ``gwns/gw/listener`` or ``port`` -> (host, port) to bind instead.
    """

    endpoints: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    listeners: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    listen_address: str = "0.0.0.0"  # noqa: S104 (a gateway listens on all addresses by default)
    cluster_domain: str = "cluster.local"
    strict_reference_grants: bool = False
    # With a directory, TLS keys are files Envoy reads (Translation.files lists what to write
    # there), not bytes inlined in the bootstrap: keys stay out of generated config.
    secret_dir: str | None = None
    # Each Gateway is served to its own Envoys (extsvc-controller run, over xDS): a port only
    # conflicts within one Gateway, and Translation.gateways lists each one's listeners.
    per_gateway: bool = False
    # Translation.explain is filled (for ``explain``); the live controller does not read it.
    explain: bool = True
    # Only Gateways of these GatewayClasses are this controller's (empty: every Gateway). Routes
    # attached only to other Gateways get no status from it.
    gateway_classes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ancestor:
    namespace: str
    name: str
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    """One Gateway listener (Gateway API ``status.listeners[]``)."""

    name: str
    attached_routes: int
    supported_kinds: tuple[str, ...]
    conditions: tuple[Condition, ...]


@dataclass(slots=True)
class Status:
    kind: str
    namespace: str
    name: str
    conditions: list[Condition] = field(default_factory=list)
    ancestors: list[Ancestor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    listeners: list[ListenerStatus] = field(default_factory=list)  # Gateways only

    @property
    def invalid(self) -> bool:
        bad = {("Accepted", "False"), ("Programmed", "False"), ("ResolvedRefs", "False")}
        return any((c.type.split("/")[-1], c.status) in bad for c in self.conditions) or any(
            (c.type, c.status) == ("Accepted", "False") for a in self.ancestors for c in a.conditions
        )


@dataclass(frozen=True, slots=True)
class FilterUse:
    """What one HCM filter does for one route, and where that came from (for ``explain``)."""

    filter: str
    runs: bool
    scope: str
    policy: str
    settings: str


@dataclass(frozen=True, slots=True)
class RouteExplain:
    route: str  # ns/name
    rule: int
    rule_name: str | None
    envoy_route: str
    listener: str
    vhost: str
    replaced: str | None
    chain: tuple[FilterUse, ...]


@dataclass(frozen=True, slots=True)
class Translation:
    bootstrap: envoy.Bootstrap
    statuses: tuple[Status, ...]
    explain: tuple[RouteExplain, ...]
    files: tuple[tuple[str, bytes], ...] = ()  # (path, content) the bootstrap refers to
    #: (Gateway key, its listeners), sorted: what each Gateway's Envoys get over xDS
    gateways: tuple[tuple[tuple[str, str], tuple[envoy.Listener, ...]], ...] = ()

    @property
    def ok(self) -> bool:
        return not any(s.invalid for s in self.statuses)
