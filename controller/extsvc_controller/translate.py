"""The translator: a snapshot of resources in, Envoy config and a status per object out.

PURE: no I/O, no clock, no randomness; the same snapshot gives byte-identical output. It follows
kgateway's scheme (docs/internals/kgateway-translation.md §3): a filter per provider
(``ext_auth/<ns>/<name>``, ``ext_proc/<ns>/<name>``, ``ratelimit/<ns>/<name>``, ``ratelimit/local``)
inserted disabled and enabled per scope; ``disable: {}`` through the set_metadata
``global_disable/*`` filters; per-filter config at RouteConfiguration / VirtualHost / Route scope
by attachment level (docs/internals/kgateway-translation.md §3.4); precedence and shallow merge per field
(docs/internals/kgateway-translation.md §3.6); an invalid policy replaces what it is attached to with a 500
(docs/internals/kgateway-translation.md §3.7: fail closed, never open).
"""

from __future__ import annotations

import base64
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from . import envoy, model
from .model import GATEWAY_API, KGATEWAY

__all__ = ["Ancestor", "Condition", "Invalid", "Options", "Snapshot", "Status", "Translation", "translate"]

CONTROLLER = "kgateway.dev/kgateway"
_H2 = {"http2", "grpc", "grpc-web", "kubernetes.io/h2c"}
# docs/internals/kgateway-translation.md §3.2: stage, relative weight (Before -1, During 0, After +1).
_STAGES = {
    "Fault": 0,
    "Cors": 1,
    "Waf": 2,
    "AuthN": 3,
    "AuthZ": 4,
    "RateLimit": 5,
    "Accepted": 6,
    "OutAuth": 7,
    "Route": 8,
}
_PREDICATE = {"Before": -1, "During": 0, "After": 1}
_PREFIX = {"ExtAuth": "extauth", "ExtProc": "extproc", "RateLimit": "ratelimit"}
_FIELDS = ("extAuth", "extProc", "rateLimit.local", "rateLimit.global")


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


@dataclass(slots=True)
class Status:
    kind: str
    namespace: str
    name: str
    conditions: list[Condition] = field(default_factory=list)
    ancestors: list[Ancestor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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

    @property
    def ok(self) -> bool:
        return not any(s.invalid for s in self.statuses)


# --- providers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Provider:
    name: str  # the HCM filter name
    kind: str
    sort_key: tuple[int, int, int, str]
    filter: envoy.HttpFilter


@dataclass(slots=True)
class Policy:
    obj_ns: str
    obj_name: str
    weight: int
    created: str
    errors: list[str]
    warnings: list[str]
    spec: model.TrafficPolicySpec | None
    targeting: model.Targeting | model.TrafficPolicySpec
    providers: dict[str, Provider] = field(default_factory=dict)  # field -> provider
    attached: set[tuple[str, str]] = field(default_factory=set)  # gateways (ns, name)
    merged: bool = False
    overridden: bool = False

    @property
    def ref(self) -> str:
        return f"{self.obj_ns}/{self.obj_name}"

    def fields(self) -> dict[str, object]:
        spec = self.spec
        if spec is None:
            return {}
        out: dict[str, object] = {}
        if spec.ext_auth is not None:
            out["extAuth"] = spec.ext_auth
        if spec.ext_proc is not None:
            out["extProc"] = spec.ext_proc
        if spec.rate_limit is not None and spec.rate_limit.local is not None:
            out["rateLimit.local"] = spec.rate_limit.local
        if spec.rate_limit is not None and spec.rate_limit.global_ is not None:
            out["rateLimit.global"] = spec.rate_limit.global_
        return out


def _weight(meta: model.Metadata) -> int:
    try:
        return int(meta.annotations.get("kgateway.dev/policy-weight", "0"))
    except ValueError:
        return 0


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("*", "wildcard"))


class _Translator:
    def __init__(self, snapshot: Snapshot, options: Options) -> None:
        self.options = options
        self.statuses: dict[tuple[str, str, str], Status] = {}
        by: dict[str, dict[tuple[str, str], model.Object]] = defaultdict(dict)
        for obj in snapshot.objects:
            by[obj.kind][(obj.metadata.namespace, obj.metadata.name)] = obj
        self.gateways: dict[tuple[str, str], model.Gateway] = by["Gateway"]  # type: ignore[assignment]
        self.routes: dict[tuple[str, str], model.HTTPRoute] = by["HTTPRoute"]  # type: ignore[assignment]
        self.services: dict[tuple[str, str], model.Service] = by["Service"]  # type: ignore[assignment]
        self.secrets: dict[tuple[str, str], model.Secret] = by["Secret"]  # type: ignore[assignment]
        self.grants: list[model.ReferenceGrant] = list(by["ReferenceGrant"].values())  # type: ignore[arg-type]
        self.extensions: dict[tuple[str, str], model.GatewayExtension] = by["GatewayExtension"]  # type: ignore[assignment]
        self.clusters: dict[str, envoy.Cluster] = {}
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
                _weight(meta),
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
        (:func:`_matches` then says which, if any, target it and at which sections)."""
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
        """(cluster name, error, http2) for one Service port; the cluster is created once."""
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
            if endpoint is not None:
                self.clusters[cname] = envoy.cluster(
                    cname, endpoint[0], endpoint[1], http2=http2, static=True
                )
            else:
                host = f"{name}.{ns}.svc.{self.options.cluster_domain}"
                self.clusters[cname] = envoy.cluster(cname, host, port, http2=http2, static=False)
        return cname, None, http2

    def provider(self, policy: Policy, ref: model.NamespacedRef, kind: str) -> Provider | None:
        prefix = _PREFIX[kind]
        ns = ref.namespace or policy.obj_ns
        ext = self.extensions.get((ns, ref.name))
        if ext is None:
            invalid = self.invalid_extensions.get((ns, ref.name))
            policy.errors.append(
                f"{prefix}: {ns}/{ref.name}: gateway extension not found"
                if invalid is None
                else f"{prefix}: gateway extension {ns}/{ref.name} is invalid: {invalid}"
            )
            return None
        if ext.spec.kind != kind:
            policy.errors.append(f"expected gatewayextension type {kind}")
            return None
        if self.options.strict_reference_grants and not self.granted(
            "TrafficPolicy", KGATEWAY, policy.obj_ns, "GatewayExtension", KGATEWAY, ns, ref.name
        ):
            policy.errors.append(f"{prefix}: missing reference grant")
            return None
        spec = ext.spec
        svc: model.ExtGrpcService | model.ExtHttpService
        if kind == "ExtAuth":
            assert spec.ext_auth is not None
            grpc = spec.ext_auth.grpc_service
            svc = grpc if grpc is not None else spec.ext_auth.http_service  # type: ignore[assignment]
            what = "ExtAuth gRPC backend" if grpc is not None else "ExtAuth HTTP backend"
        elif kind == "ExtProc":
            assert spec.ext_proc is not None
            svc, what = spec.ext_proc.grpc_service, "ExtProc backend"
        else:
            assert spec.rate_limit is not None
            svc, what = spec.rate_limit.grpc_service, "RateLimit backend"
        lead = f"{prefix}: ratelimit" if kind == "RateLimit" else prefix
        backend = svc.backend_ref
        if backend.kind != "Service" or backend.group != "":
            policy.errors.append(
                f"{lead}: failed to resolve {what}: unsupported backend kind "
                f"{backend.group or 'core'}/{backend.kind}"
            )
            return None
        bns = backend.namespace or ns
        if not self.granted("GatewayExtension", KGATEWAY, ns, "Service", "", bns, backend.name):
            policy.errors.append(f"{lead}: failed to resolve {what}: missing reference grant")
            return None
        assert backend.port is not None
        cname, error, http2 = self.service_cluster(bns, backend.name, backend.port)
        if cname is None:
            policy.errors.append(f"{lead}: failed to resolve {what}: {error}")
            return None
        name = f"{kind.lower().replace('extauth', 'ext_auth').replace('extproc', 'ext_proc')}/{ns}/{ref.name}"
        if isinstance(svc, model.ExtGrpcService) and not http2:
            # docs/internals/kgateway-translation.md §3.3: without appProtocol the gRPC extension gets
            # HTTP/1.1 and every call fails; kgateway does this silently, we say so.
            policy.warnings.append(
                f"{name}: Service {bns}/{backend.name} port {backend.port} has no appProtocol grpc/http2/"
                "kubernetes.io/h2c: Envoy will speak HTTP/1.1 to it and every gRPC call will fail"
            )
        weight = _weight(ext.metadata)
        if kind == "ExtAuth":
            assert spec.ext_auth is not None
            return Provider(
                name,
                kind,
                (_STAGES["AuthN"] * 3, 0, -weight, name),
                envoy.ext_authz_filter(name, spec.ext_auth, cname),
            )
        if kind == "ExtProc":
            assert spec.ext_proc is not None
            stage = spec.ext_proc.filter_stage or model.FilterStage(stage="AuthZ", predicate="After")
            if stage.stage == "Route" and stage.predicate == "After":
                policy.warnings.append(
                    f"{name}: filterStage Route/After (upstream filter) is not supported; "
                    "placed just before the router"
                )
            key = (_STAGES[stage.stage] * 3 + _PREDICATE[stage.predicate], 1, -stage.weight, name)
            return Provider(name, kind, key, envoy.ext_proc_filter(name, spec.ext_proc, cname))
        assert spec.rate_limit is not None
        return Provider(
            name,
            kind,
            (_STAGES["RateLimit"] * 3, 2, 0, name),
            envoy.ratelimit_filter(name, spec.rate_limit, cname),
        )

    def construct(self) -> None:
        """Resolve each valid policy's providers; errors make it invalid (kgateway ``ConstructIR``)."""
        for (ns, name), gwext in sorted(self.extensions.items()):
            if gwext.spec.kind in ("JWT", "OAuth2"):
                # Out of scope for extsvc: say so rather than nothing.
                # docs/internals/kgateway-translation.md §1.1.
                self.status("GatewayExtension", ns, name).conditions.append(
                    Condition(
                        "extsvc.dev/Supported",
                        "False",
                        "UnsupportedType",
                        f"type {gwext.spec.kind} is not translated by extsvc-controller: a TrafficPolicy "
                        "that uses it is rejected and its targets answer 500 (fail closed)",
                    )
                )
        for policy in self.policies.values():
            spec = policy.spec
            if spec is None:
                continue
            for section, ref in spec.unenforceable.items():
                # A security section we cannot enforce: reject the policy, so that its targets
                # answer 500 instead of letting everything through (docs/controller.md).
                what = ""
                if ref is not None:
                    ext_key = (ref[0] or policy.obj_ns, ref[1])
                    ext = self.extensions.get(ext_key)
                    invalid = self.invalid_extensions.get(ext_key)
                    what = f" (GatewayExtension {ext_key[0]}/{ext_key[1]}" + (
                        f", type {ext.spec.kind})"
                        if ext is not None
                        else (": not found)" if invalid is None else f" is invalid: {invalid})")
                    )
                policy.errors.append(
                    f"{section}: not supported by extsvc-controller{what}; rejected to fail closed"
                )
            if spec.ext_auth is not None and spec.ext_auth.extension_ref is not None:
                p = self.provider(policy, spec.ext_auth.extension_ref, "ExtAuth")
                if p:
                    policy.providers["extAuth"] = p
            if spec.ext_proc is not None and spec.ext_proc.extension_ref is not None:
                p = self.provider(policy, spec.ext_proc.extension_ref, "ExtProc")
                if p:
                    policy.providers["extProc"] = p
            if spec.rate_limit is not None and spec.rate_limit.global_ is not None:
                p = self.provider(policy, spec.rate_limit.global_.extension_ref, "RateLimit")
                if p:
                    policy.providers["rateLimit.global"] = p

    # --- merging ------------------------------------------------------------------------------

    def merge(self, attached: Sequence[tuple[int, Policy]]) -> tuple[dict[str, Policy], list[Policy]]:
        """Shallow merge per field (docs/internals/kgateway-translation.md §3.6).

        :returns: (winner per field, invalid policies among ``attached``).
        """
        ordered = sorted(attached, key=lambda lp: (-lp[0], -lp[1].weight, lp[1].created, lp[1].ref))
        invalid = [p for _, p in ordered if p.errors]
        winners: dict[str, Policy] = {}
        for _, policy in ordered:
            if policy.errors:
                continue
            for name in policy.fields():
                if name in winners:
                    if winners[name] is not policy:
                        policy.overridden = True
                else:
                    winners[name] = policy
        contributors = {id(p) for p in winners.values()}
        if len(contributors) > 1:
            for p in winners.values():
                p.merged = True
        return winners, invalid

    def per_filter(
        self, winners: Mapping[str, Policy]
    ) -> tuple[dict[str, envoy.Any], dict[str, list[str]], dict[str, tuple[str, str]]]:
        """typed_per_filter_config for one scope, merge origins, and filter -> (policy, settings)."""
        config: dict[str, envoy.Any] = {}
        origins: dict[str, list[str]] = {}
        explain: dict[str, tuple[str, str]] = {}
        for name in _FIELDS:
            policy = winners.get(name)
            if policy is None or policy.spec is None:
                continue
            spec = policy.spec
            origins[name] = [f"{KGATEWAY}/TrafficPolicy/{policy.ref}"]
            if name == "extAuth":
                assert spec.ext_auth is not None
                ctx = spec.ext_auth.context_extensions
                _provider_or_disable(
                    config, explain, policy, name, spec.ext_auth.disable is not None,
                    envoy.DISABLE_EXT_AUTH, envoy.ext_authz_per_route, spec.ext_auth,
                    f"contextExtensions={dict(sorted(ctx.items()))}" if ctx else "",
                )
            elif name == "extProc":
                assert spec.ext_proc is not None
                mode = spec.ext_proc.processing_mode
                _provider_or_disable(
                    config, explain, policy, name, spec.ext_proc.disable is not None,
                    envoy.DISABLE_EXT_PROC, envoy.ext_proc_per_route, spec.ext_proc,
                    f"processingMode={mode.model_dump(by_alias=True)}" if mode else "",
                )
            elif name == "rateLimit.local":
                assert spec.rate_limit is not None and spec.rate_limit.local is not None
                local = spec.rate_limit.local
                config[envoy.LOCAL_RATELIMIT] = envoy.local_ratelimit_per_route(local)
                bucket = local.token_bucket
                explain[envoy.LOCAL_RATELIMIT] = (
                    policy.ref,
                    "local: {} (disabled)"
                    if bucket is None
                    else f"{bucket.max_tokens} tokens, +{bucket.tokens_per_fill} every "
                    f"{bucket.fill_interval}",
                )
            else:
                assert spec.rate_limit is not None and spec.rate_limit.global_ is not None
                p = policy.providers[name]
                config[p.name] = envoy.ratelimit_per_route(spec.rate_limit.global_)
                explain[p.name] = (
                    policy.ref,
                    "descriptors="
                    + " | ".join(
                        ",".join(
                            e.type
                            + (f"({e.header})" if e.header else "")
                            + (f"({e.generic.key}={e.generic.value})" if e.generic else "")
                            for e in d.entries
                        )
                        for d in spec.rate_limit.global_.descriptors
                    ),
                )
        return config, origins, explain


def _matches(policy: Policy, kind: str, ns: str, name: str, labels: Mapping[str, str]) -> list[str | None]:
    """The sectionNames (None = whole object) by which ``policy`` targets this object."""
    if policy.obj_ns != ns:
        return []
    out: list[str | None] = []
    group = GATEWAY_API
    for ref in policy.targeting.target_refs or ():
        if ref.kind == kind and ref.group == group and ref.name == name:
            out.append(ref.section_name)
    for sel in policy.targeting.target_selectors or ():
        if (
            sel.kind == kind
            and sel.group == group
            and all(labels.get(k) == v for k, v in sel.match_labels.items())
        ):
            out.append(sel.section_name)
    return out


def _host_matches(listener: str | None, host: str) -> bool:
    if listener is None:
        return True
    if listener.startswith("*."):
        return host.endswith(listener[1:]) or (host.startswith("*.") and host.endswith(listener[1:]))
    if host.startswith("*."):
        return listener.endswith(host[1:])
    return listener == host


def _hostnames(listener: model.Listener, route: model.HTTPRoute) -> list[str]:
    if not route.spec.hostnames:
        return [listener.hostname or "*"]
    out = []
    for host in route.spec.hostnames:
        if _host_matches(listener.hostname, host):
            # the more specific of the two
            if listener.hostname and host.startswith("*.") and not listener.hostname.startswith("*."):
                out.append(listener.hostname)
            else:
                out.append(host)
    return sorted(set(out))


def _precedence(match: model.RouteMatch) -> tuple[int, int, int, int, int]:
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
class _Entry:
    route: model.HTTPRoute
    rule_index: int
    match_index: int
    listener: model.Listener
    created: str


def translate(snapshot: Snapshot, options: Options | None = None) -> Translation:
    """Translate ``snapshot`` into an Envoy bootstrap, a status per object and the explain data."""
    with envoy.no_gc():
        return _translate(snapshot, options)


def _translate(snapshot: Snapshot, options: Options | None) -> Translation:
    t = _Translator(snapshot, options or Options())
    t.construct()
    listeners: list[envoy.Listener] = []
    secrets: dict[str, envoy.Secret] = {}
    files: dict[str, bytes] = {}
    explains: list[RouteExplain] = []
    route_replaced: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    route_parents: dict[tuple[str, str], list[tuple[model.ParentReference, str, str, str]]] = defaultdict(
        list
    )
    used_ports: dict[int, tuple[str, str]] = {}

    for gw_key in sorted(t.gateways):
        gw = t.gateways[gw_key]
        gw_status = t.status("Gateway", *gw_key)
        gw_conditions: list[Condition] = []
        gw_policies = [
            p
            for p in t.targeting("Gateway", *gw_key)
            if _matches(p, "Gateway", gw_key[0], gw_key[1], gw.metadata.labels)
        ]
        # Which routes attach to which listener.
        attached: dict[str, list[_Entry]] = defaultdict(list)
        for r_key in sorted(t.routes):
            route = t.routes[r_key]
            for parent in route.spec.parent_refs:
                if (
                    parent.kind != "Gateway"
                    or (parent.namespace or r_key[0]) != gw_key[0]
                    or parent.name != gw_key[1]
                ):
                    continue
                listeners_for = [ln for ln in gw.spec.listeners if parent.section_name in (None, ln.name)]
                accepted_any = False
                for ln in listeners_for:
                    allowed = ln.allowed_routes.namespaces.from_
                    if allowed == "Same" and r_key[0] != gw_key[0]:
                        continue
                    if allowed == "Selector":
                        continue
                    if not _hostnames(ln, route):
                        continue
                    accepted_any = True
                    for ri, rule in enumerate(route.spec.rules):
                        for mi in range(len(rule.matches)):
                            attached[ln.name].append(
                                _Entry(route, ri, mi, ln, route.metadata.creation_timestamp or "")
                            )
                reason = "Accepted" if accepted_any else "NotAllowedByListeners"
                route_parents[r_key].append((parent, gw_key[0], gw_key[1], reason))

        # Group the Gateway's listeners by port.
        by_port: dict[int, list[model.Listener]] = defaultdict(list)
        for ln in gw.spec.listeners:
            by_port[ln.port].append(ln)
        for port in sorted(by_port):
            group = by_port[port]
            if port in used_ports or len({ln.protocol for ln in group}) > 1:
                gw_conditions.append(
                    Condition("Accepted", "False", "ListenersNotValid", f"port {port}: conflicting listeners")
                )
                continue
            used_ports[port] = gw_key
            bind = (
                t.options.listeners.get(f"{gw_key[0]}/{gw_key[1]}/{group[0].name}")
                or t.options.listeners.get(str(port))
                or (t.options.listen_address, port)
            )
            chains: list[envoy.FilterChain] = []
            if group[0].protocol == "HTTP":
                rc_name = f"listener~{port}"
                chain = _chain(
                    t,
                    gw_key,
                    gw_status,
                    gw_policies,
                    rc_name,
                    group,
                    attached,
                    explains,
                    route_replaced,
                    https=False,
                )
                chains.append(envoy.filter_chain(chain, name=rc_name))
            else:
                for ln in sorted(group, key=lambda x: x.name):
                    rc_name = f"listener~{port}~{ln.name}"
                    names = []
                    for ref in ln.tls.certificate_refs if ln.tls else []:
                        sns = ref.namespace or gw_key[0]
                        secret = t.secrets.get((sns, ref.name))
                        problem = None
                        if not t.granted("Gateway", GATEWAY_API, gw_key[0], "Secret", "", sns, ref.name):
                            problem = "missing reference grant"
                        elif secret is None:
                            problem = "not found"
                        elif not secret.data.get("tls.crt") or not secret.data.get("tls.key"):
                            problem = "has no tls.crt and tls.key"
                        if problem is not None or secret is None:
                            gw_conditions.append(
                                Condition(
                                    "ResolvedRefs",
                                    "False",
                                    "InvalidCertificateRef",
                                    f"listener {ln.name}: Secret {sns}/{ref.name}: {problem}",
                                )
                            )
                            continue
                        sname = f"{sns}/{ref.name}"
                        crt = base64.b64decode(secret.data["tls.crt"])
                        key = base64.b64decode(secret.data["tls.key"])
                        if t.options.secret_dir is None:
                            secrets[sname] = envoy.tls_secret(sname, crt, key)
                        else:
                            base = f"{t.options.secret_dir.rstrip('/')}/{sns}/{ref.name}"
                            files[f"{base}/tls.crt"] = crt
                            files[f"{base}/tls.key"] = key
                            secrets[sname] = envoy.tls_secret_files(
                                sname, f"{base}/tls.crt", f"{base}/tls.key"
                            )
                        names.append(sname)
                    if not names:
                        continue
                    chain = _chain(
                        t,
                        gw_key,
                        gw_status,
                        gw_policies,
                        rc_name,
                        [ln],
                        attached,
                        explains,
                        route_replaced,
                        https=True,
                    )
                    server_names = [ln.hostname] if ln.hostname else []
                    chains.append(
                        envoy.filter_chain(chain, server_names=server_names, secret_names=names, name=rc_name)
                    )
            if chains:
                listeners.append(envoy.listener(f"listener~{port}", bind[0], bind[1], chains))
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

    # HTTPRoute statuses.
    for r_key in sorted(t.routes):
        st = t.status("HTTPRoute", *r_key)
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
        refs_ok = _route_refs(t, r_key, st)
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
                    f"{'kgateway.dev'}/Programmed",
                    "False",
                    "RouteRuleReplaced",
                    "; ".join(f"Replaced Rule ({i}): {msg}" for i, msg in sorted(replaced.items())),
                )
            )

    _policy_statuses(t)
    cluster_list = [t.clusters[k] for k in sorted(t.clusters)]
    boot = envoy.bootstrap(t.options.admin, listeners, cluster_list, [secrets[k] for k in sorted(secrets)])
    statuses = tuple(t.statuses[k] for k in sorted(t.statuses))
    return Translation(boot, statuses, tuple(explains), tuple(sorted(files.items())))


def _route_refs(t: _Translator, r_key: tuple[str, str], st: Status) -> bool:
    ok = True
    for rule in t.routes[r_key].spec.rules:
        for b in rule.backend_refs:
            if _backend(t, r_key[0], b)[1] is not None:
                ok = False
    return ok


def _backend(t: _Translator, ns: str, b: model.BackendRef) -> tuple[str | None, str | None]:
    if b.kind != "Service" or b.group != "":
        return None, f"unsupported backend kind {b.kind}"
    bns = b.namespace or ns
    if not t.granted("HTTPRoute", GATEWAY_API, ns, "Service", "", bns, b.name):
        return None, f"backendRef {bns}/{b.name}: missing reference grant"
    if b.port is None:
        return None, f"backendRef {bns}/{b.name}: port is required"
    cname, error, _ = t.service_cluster(bns, b.name, b.port)
    return cname, error


def _chain(
    t: _Translator,
    gw_key: tuple[str, str],
    gw_status: Status,
    gw_policies: list[Policy],
    rc_name: str,
    group: list[model.Listener],
    attached: Mapping[str, list[_Entry]],
    explains: list[RouteExplain],
    route_replaced: dict[tuple[str, str], dict[int, str]],
    *,
    https: bool,
) -> envoy.Filter:
    """One HCM: its RouteConfiguration (vhosts, routes, per-scope config) and its filter list."""
    used: dict[str, Provider] = {}
    disables: set[str] = set()
    whole = (
        [(0, p) for p in gw_policies if None in _matches(p, "Gateway", *gw_key, {})]
        if False
        else [
            (0, p)
            for p in gw_policies
            if None in _matches(p, "Gateway", gw_key[0], gw_key[1], t.gateways[gw_key].metadata.labels)
        ]
    )
    labels = t.gateways[gw_key].metadata.labels

    def section(ln: model.Listener) -> list[tuple[int, Policy]]:
        return [
            (1, p) for p in gw_policies if ln.name in _matches(p, "Gateway", gw_key[0], gw_key[1], labels)
        ]

    def note(cfg: Mapping[str, envoy.Any], winners: Mapping[str, Policy]) -> None:
        for field_name, policy in winners.items():
            policy.attached.add(gw_key)
            if field_name in policy.providers:
                used[policy.providers[field_name].name] = policy.providers[field_name]
        for name in cfg:
            if name.startswith("global_disable/"):
                disables.add(name)

    # RouteConfiguration scope: the whole Gateway (HTTPS: merged with the listener, which wins).
    rc_scope = whole + (section(group[0]) if https else [])
    rc_winners, rc_invalid = t.merge(rc_scope)
    rc_cfg, rc_origins, rc_explain = t.per_filter(rc_winners)
    for _, p in rc_scope:
        p.attached.add(gw_key)
    if rc_invalid:
        reason = (
            "ListenerReplaced"
            if https and any(p in [q for _, q in section(group[0])] for p in rc_invalid)
            else "GatewayReplaced"
        )
        gw_status.conditions.append(
            Condition(
                "Accepted",
                "False",
                reason,
                "; ".join(f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in rc_invalid),
            )
        )
        rc = envoy.replaced_route_configuration(rc_name)
        return envoy.http_connection_manager(rc, [envoy.router_filter()])
    note(rc_cfg, rc_winners)

    vhosts: list[envoy.VirtualHost] = []
    pending: list[tuple[_Entry, str, str, dict[str, tuple[str, str]], dict[str, tuple[str, str]]]] = []
    seen_domains: set[str] = set()
    port = group[0].port
    for ln in sorted(group, key=lambda x: x.name):
        entries = attached.get(ln.name, [])
        by_host: dict[str, list[_Entry]] = defaultdict(list)
        for e in entries:
            for host in _hostnames(ln, e.route):
                by_host[host].append(e)
        if not by_host and ln.hostname:
            by_host[ln.hostname] = []
        vh_scope = [] if https else section(ln)
        vh_winners, vh_invalid = t.merge(vh_scope)
        for _, p in vh_scope:
            p.attached.add(gw_key)
        vh_cfg, vh_origins, vh_explain = t.per_filter(vh_winners)
        if vh_invalid:
            gw_status.conditions.append(
                Condition(
                    "Accepted",
                    "False",
                    "ListenerReplaced",
                    f"listener {ln.name}: "
                    + "; ".join(
                        f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in vh_invalid
                    ),
                )
            )
        else:
            note(vh_cfg, vh_winners)
        for host in sorted(by_host):
            if host in seen_domains:
                gw_status.conditions.append(
                    Condition(
                        "Accepted",
                        "False",
                        "HostnameConflict",
                        f"listener {ln.name}: hostname {host} already used",
                    )
                )
                continue
            seen_domains.add(host)
            vh_name = f"listener~{port}~{_sanitize(host)}"
            ordered = sorted(
                by_host[host],
                key=lambda e: (
                    tuple(-x for x in _precedence(e.route.spec.rules[e.rule_index].matches[e.match_index])),
                    e.created,
                    e.route.metadata.namespace,
                    e.route.metadata.name,
                    e.rule_index,
                    e.match_index,
                ),
            )
            routes: list[envoy.Route] = []
            for e in ordered:
                r, rv_explain = _route(t, e, vh_invalid, route_replaced, note)
                routes.append(r)
                if rv_explain is not None:
                    pending.append((e, vh_name, r.name, rv_explain, vh_explain))
            vhosts.append(
                envoy.virtual_host(
                    vh_name, [host], routes, {} if vh_invalid else vh_cfg, {} if vh_invalid else vh_origins
                )
            )
    # Explain once the HCM's filter list is complete.
    for e, vh_name, rname, rv_explain, vh_explain in pending:
        explains.append(
            _explain(e, rc_name, vh_name, rname, rv_explain, (rc_explain, vh_explain), used, disables, t)
        )
    rc = envoy.route_configuration(rc_name, vhosts, rc_cfg, rc_origins)
    filters = [envoy.disable_filter(n) for n in sorted(disables)]
    filters += [p.filter for p in sorted(used.values(), key=lambda p: p.sort_key)]
    if envoy.LOCAL_RATELIMIT in _local_users(rc):
        # ratelimit/local sorts by name among the During-RateLimit filters
        # (docs/internals/kgateway-translation.md §3.2).
        filters.append(envoy.local_ratelimit_filter())
        filters = _sort_filters(filters, used)
    filters.append(envoy.router_filter())
    return envoy.http_connection_manager(rc, filters)


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
            return (_STAGES["RateLimit"] * 3, 2, 0, f.name)
        return used[f.name].sort_key

    return sorted(filters, key=key)


def _route(
    t: _Translator,
    e: _Entry,
    vh_invalid: list[Policy],
    route_replaced: dict[tuple[str, str], dict[int, str]],
    note: object,
) -> tuple[envoy.Route, dict[str, tuple[str, str]] | None]:
    route = e.route
    ns, name = route.metadata.namespace, route.metadata.name
    rule = route.spec.rules[e.rule_index]
    rname = f"{ns}-{name}-rule-{e.rule_index}-match-{e.match_index}"
    match = envoy.route_match(rule.matches[e.match_index])
    # Route-scope policies: ExtensionRef > targetRef with sectionName > whole route
    # (docs/internals/kgateway-translation.md §3.6).
    scope: list[tuple[int, Policy]] = []
    problems: list[str] = []
    for p in t.targeting("HTTPRoute", ns, name):
        for section in _matches(p, "HTTPRoute", ns, name, route.metadata.labels):
            if section is None:
                scope.append((0, p))
            elif section == rule.name:
                scope.append((1, p))
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
                scope.append((2, policy))
        elif flt.type not in ("ExtensionRef", "RequestHeaderModifier"):
            problems.append(f"filter type {flt.type} is not supported by extsvc-controller")
    winners, invalid = t.merge(scope)
    problems += [f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in invalid]
    if vh_invalid:
        problems += [f"{KGATEWAY}/TrafficPolicy/{p.ref}: {'; '.join(p.errors)}" for p in vh_invalid]
    for _, p in scope:
        gws = {(pr.namespace or ns, pr.name) for pr in route.spec.parent_refs}
        p.attached |= {g for g in gws if g in t.gateways}
    if problems:
        route_replaced[(ns, name)][e.rule_index] = "; ".join(problems)
        return envoy.replaced_route(rname, match), {"": ("", "; ".join(problems))}
    cfg, origins, explain = t.per_filter(winners)
    assert callable(note)
    note(cfg, winners)
    clusters: list[tuple[str, int]] = []
    for b in rule.backend_refs:
        cname, _ = _backend(t, ns, b)
        if cname is not None and b.weight > 0:
            clusters.append((cname, b.weight))
    modifier = next(
        (f.request_header_modifier for f in rule.filters if f.type == "RequestHeaderModifier"), None
    )
    return envoy.route(rname, match, clusters, cfg, envoy.header_options(modifier), origins), explain


def _explain(
    e: _Entry,
    rc_name: str,
    vh_name: str,
    envoy_route: str,
    route_explain: Mapping[str, tuple[str, str]],
    outer: tuple[Mapping[str, tuple[str, str]], Mapping[str, tuple[str, str]]],
    used: Mapping[str, Provider],
    disables: Iterable[str],
    t: _Translator,
) -> RouteExplain:
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


def _policy_statuses(t: _Translator) -> None:
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


_Section = TypeVar("_Section")


def _provider_or_disable(
    config: dict[str, envoy.Any],
    explain: dict[str, tuple[str, str]],
    policy: Policy,
    field: str,
    disabled: bool,
    disable_filter: str,
    per_route: Callable[[_Section], envoy.Any],
    section: _Section,
    settings: str,
) -> None:
    """extAuth / extProc at one scope: ``disable: {}`` switches the global-disable filter on,
    otherwise the provider's filter gets its per-route config."""
    if disabled:
        config[disable_filter] = envoy.enable()
        explain[disable_filter] = (policy.ref, "disable: {}")
        return
    provider = policy.providers[field].name
    config[provider] = per_route(section)
    explain[provider] = (policy.ref, settings)
