"""A Gateway's listeners: grouped by port, one Envoy listener each; HTTPS filter chains and TLS."""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import envoy, model
from .chains import GatewayScope, chain
from .context import Context
from .model import GATEWAY_API
from .results import Condition


@dataclass(slots=True)
class Resources:
    """What the listeners add to the bootstrap, across Gateways."""

    listeners: list[envoy.Listener] = field(default_factory=list)
    secrets: dict[str, envoy.Secret] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content (with a secret_dir)
    #: port (or, with Options.per_gateway, (Gateway key, port)) -> the Gateway that has it
    used_ports: dict[object, tuple[str, str]] = field(default_factory=dict)
    #: each Gateway's listeners (what the xDS server sends the Envoys of that Gateway)
    by_gateway: dict[tuple[str, str], list[envoy.Listener]] = field(default_factory=dict)


def gateway_listeners(scope: GatewayScope, out: Resources) -> list[Condition]:
    """An Envoy listener per port of the Gateway (whose listeners are grouped by port).

    :returns: the Gateway's listener and certificate problems (its Accepted/ResolvedRefs).
    """
    t, gw_key = scope.t, scope.key
    gw_conditions: list[Condition] = []
    by_port: dict[int, list[model.Listener]] = defaultdict(list)
    for ln in t.gateways[gw_key].spec.listeners:
        by_port[ln.port].append(ln)
    for port in sorted(by_port):
        group = by_port[port]
        # one Envoy for every Gateway (render): a port is taken once; one per Gateway (xDS):
        # only a Gateway's own listeners can conflict
        port_key: object = (gw_key, port) if t.options.per_gateway else port
        if port_key in out.used_ports or len({ln.protocol for ln in group}) > 1:
            gw_conditions.append(
                Condition("Accepted", "False", "ListenersNotValid", f"port {port}: conflicting listeners")
            )
            continue
        out.used_ports[port_key] = gw_key
        bind = (
            t.options.listeners.get(f"{gw_key[0]}/{gw_key[1]}/{group[0].name}")
            or t.options.listeners.get(str(port))
            or (t.options.listen_address, port)
        )
        if group[0].protocol == "HTTP":
            rc_name = f"listener~{port}"
            chains = [envoy.filter_chain(chain(scope, rc_name, group, https=False), name=rc_name)]
        else:
            chains = _tls_chains(scope, port, group, out, gw_conditions)
        if chains:
            built = envoy.listener(f"listener~{port}", bind[0], bind[1], chains)
            out.listeners.append(built)
            out.by_gateway.setdefault(gw_key, []).append(built)
    return gw_conditions


def _tls_chains(
    scope: GatewayScope,
    port: int,
    group: Sequence[model.Listener],
    out: Resources,
    gw_conditions: list[Condition],
) -> list[envoy.FilterChain]:
    """HTTPS: a filter chain per listener (SNI = its hostname), none for one without a usable
    certificate."""
    chains: list[envoy.FilterChain] = []
    for ln in sorted(group, key=lambda x: x.name):
        rc_name = f"listener~{port}~{ln.name}"
        names = _certificates(scope.t, scope.key, ln, out, gw_conditions)
        if not names:
            continue
        hcm = chain(scope, rc_name, [ln], https=True)
        server_names = [ln.hostname] if ln.hostname else []
        chains.append(envoy.filter_chain(hcm, server_names=server_names, secret_names=names, name=rc_name))
    return chains


def _certificates(
    t: Context, gw_key: tuple[str, str], ln: model.Listener, out: Resources, gw_conditions: list[Condition]
) -> list[str]:
    """The listener's certificateRefs as Envoy secret names; each Secret is inlined in the
    bootstrap or, with a secret_dir, written there. An unusable one is a condition."""
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
            out.secrets[sname] = envoy.tls_secret(sname, crt, key)
        else:
            base = f"{t.options.secret_dir.rstrip('/')}/{sns}/{ref.name}"
            out.files[f"{base}/tls.crt"] = crt
            out.files[f"{base}/tls.key"] = key
            out.secrets[sname] = envoy.tls_secret_files(sname, f"{base}/tls.crt", f"{base}/tls.key")
        names.append(sname)
    return names
