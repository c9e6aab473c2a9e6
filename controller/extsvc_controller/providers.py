"""GatewayExtensions: each policy's providers (an HTTP filter and its cluster), kgateway's ConstructIR."""

from __future__ import annotations

from collections.abc import Callable

from . import envoy, model
from .context import Context
from .model import KGATEWAY
from .policies import PREDICATE, STAGES, Policy, Provider, policy_weight
from .results import Condition

_PREFIX = {"ExtAuth": "extauth", "ExtProc": "extproc", "RateLimit": "ratelimit"}


def provider(t: Context, policy: Policy, ref: model.NamespacedRef, kind: str) -> Provider | None:
    """The provider a policy's extensionRef names, or None with the reason in ``policy.errors``."""
    prefix = _PREFIX[kind]
    ns = ref.namespace or policy.obj_ns
    ext = t.extensions.get((ns, ref.name))
    if ext is None:
        invalid = t.invalid_extensions.get((ns, ref.name))
        policy.errors.append(
            f"{prefix}: {ns}/{ref.name}: gateway extension not found"
            if invalid is None
            else f"{prefix}: gateway extension {ns}/{ref.name} is invalid: {invalid}"
        )
        return None
    if ext.spec.kind != kind:
        policy.errors.append(f"expected gatewayextension type {kind}")
        return None
    if t.options.strict_reference_grants and not t.granted(
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
    if not t.granted("GatewayExtension", KGATEWAY, ns, "Service", "", bns, backend.name):
        policy.errors.append(f"{lead}: failed to resolve {what}: missing reference grant")
        return None
    assert backend.port is not None
    cname, error, http2 = t.service_cluster(bns, backend.name, backend.port)
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
    weight = policy_weight(ext.metadata)
    if kind == "ExtAuth":
        auth = spec.ext_auth
        assert auth is not None
        return Provider(
            name,
            kind,
            (STAGES["AuthN"] * 3, 0, -weight, name),
            _filter(t, name, cname, lambda: envoy.ext_authz_filter(name, auth, cname)),
        )
    if kind == "ExtProc":
        proc = spec.ext_proc
        assert proc is not None
        stage = proc.filter_stage or model.FilterStage(stage="AuthZ", predicate="After")
        if stage.stage == "Route" and stage.predicate == "After":
            policy.warnings.append(
                f"{name}: filterStage Route/After (upstream filter) is not supported; "
                "placed just before the router"
            )
        mode = proc.processing_mode
        cut = [f"{which} {body}" for which, body in (("request", mode.request_body_mode),
                                                    ("response", mode.response_body_mode))
               if body in _HELD_BODY_MODES] if mode is not None else []
        if proc.fail_open and cut:
            # Envoy's failure_mode_allow: when extsvc fails mid-body, the rest of the body goes
            # on unprocessed -- after a processor that holds chunks back, only its tail.
            policy.warnings.append(
                f"{name}: failOpen (kgateway's default) with a {' and '.join(cut)} body: if "
                "extsvc fails mid-body, Envoy sends the rest of it on unprocessed, so a processor "
                "that collects the body (json-redact) lets only its tail through; set failOpen: "
                "false where bodies are redacted (or json-redact's collect: envoy)"
            )
        key = (STAGES[stage.stage] * 3 + PREDICATE[stage.predicate], 1, -stage.weight, name)
        return Provider(
            name, kind, key,
            _filter(t, name, cname, lambda: envoy.ext_proc_filter(name, proc, cname)),
        )
    limit = spec.rate_limit
    assert limit is not None
    return Provider(
        name,
        kind,
        (STAGES["RateLimit"] * 3, 2, 0, name),
        _filter(t, name, cname, lambda: envoy.ratelimit_filter(name, limit, cname)),
    )


#: body modes in which a processor may hold chunks back (answered empty) until the body ends
_HELD_BODY_MODES = ("STREAMED", "BUFFERED_PARTIAL")


def _filter(t: Context, name: str, cluster: str, build: Callable[[], envoy.HttpFilter]) -> envoy.HttpFilter:
    """One GatewayExtension's filter, built once per translation (every policy using it shares it)."""
    key = (name, cluster)
    built = t.provider_filters.get(key)
    if built is None:
        built = t.provider_filters[key] = build()
    return built


def construct(t: Context) -> None:
    """Resolve each valid policy's providers; errors make it invalid (kgateway ``ConstructIR``)."""
    for (ns, name), gwext in sorted(t.extensions.items()):
        if gwext.spec.kind in ("JWT", "OAuth2"):
            # Out of scope for extsvc: say so rather than nothing.
            # docs/internals/kgateway-translation.md §1.1.
            t.status("GatewayExtension", ns, name).conditions.append(
                Condition(
                    "extsvc.dev/Supported",
                    "False",
                    "UnsupportedType",
                    f"type {gwext.spec.kind} is not translated by extsvc-controller: a TrafficPolicy "
                    "that uses it is rejected and its targets answer 500 (fail closed)",
                )
            )
    for policy in t.policies.values():
        spec = policy.spec
        if spec is None:
            continue
        for section, ref in spec.unenforceable.items():
            # A security section we cannot enforce: reject the policy, so that its targets
            # answer 500 instead of letting everything through (docs/controller.md).
            what = ""
            if ref is not None:
                ext_key = (ref[0] or policy.obj_ns, ref[1])
                ext = t.extensions.get(ext_key)
                invalid = t.invalid_extensions.get(ext_key)
                what = f" (GatewayExtension {ext_key[0]}/{ext_key[1]}" + (
                    f", type {ext.spec.kind})"
                    if ext is not None
                    else (": not found)" if invalid is None else f" is invalid: {invalid})")
                )
            policy.errors.append(
                f"{section}: not supported by extsvc-controller{what}; rejected to fail closed"
            )
        if spec.ext_auth is not None and spec.ext_auth.extension_ref is not None:
            p = provider(t, policy, spec.ext_auth.extension_ref, "ExtAuth")
            if p:
                policy.providers["extAuth"] = p
        if spec.ext_proc is not None and spec.ext_proc.extension_ref is not None:
            p = provider(t, policy, spec.ext_proc.extension_ref, "ExtProc")
            if p:
                policy.providers["extProc"] = p
        if spec.rate_limit is not None and spec.rate_limit.global_ is not None:
            p = provider(t, policy, spec.rate_limit.global_.extension_ref, "RateLimit")
            if p:
                policy.providers["rateLimit.global"] = p
