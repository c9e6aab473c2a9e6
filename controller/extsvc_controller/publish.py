"""A translation -> what the ADS server sends each Gateway's Envoys.

``render`` writes one bootstrap with everything inline. Over xDS the same config is cut into the
five resource types Envoy fetches on its own: listeners (LDS) whose connection managers name their
route table (RDS) instead of holding it, the clusters they refer to (CDS), each cluster's endpoints
(EDS) and the TLS certificates (SDS, so that keys never sit in a listener and a rotation touches
nothing else). A Gateway's Envoys get only what its listeners refer to: a route's cluster, an
extension's gRPC cluster, a certificate.

The cut is made on proto-JSON (the renderer's dicts), then parsed into xds-protos' messages, the
classes the ADS server speaks; every typed extension the config packs is imported on first use so
that its ``Any`` can be parsed.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from .envoy import output
from .memo import Memo
from .results import Translation

#: A dynamic resource fetched over the ADS stream the bootstrap opened.
ADS_SOURCE: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
#: the order a change is pushed in (make before break: what is referred to goes first)
TYPE_ORDER = (CLUSTER, ENDPOINTS, LISTENER, ROUTES, SECRET)

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


@dataclass(slots=True)
class GatewayResources:
    """One Gateway's resources as proto-JSON, by type URL and name."""

    by_type: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {t: {} for t in TYPE_ORDER}
    )

    def messages(self, memo: Memo | None = None) -> dict[str, dict[str, Message]]:
        """The same resources as xds-protos messages (what the ADS server sends); with ``memo``,
        route entries written in an earlier build are not parsed again (see :mod:`.memo`)."""
        out: dict[str, dict[str, Message]] = {}
        for type_url, items in self.by_type.items():
            convert = to_message
            if type_url == ROUTES and memo is not None:
                convert = functools.partial(_route_table, memo=memo)
            out[type_url] = {name: convert(type_url, body) for name, body in sorted(items.items())}
        return out


def group_name(key: tuple[str, str]) -> str:
    """The xDS group of a Gateway: ``<namespace>/<name>`` (what a node's metadata names)."""
    return f"{key[0]}/{key[1]}"


def split(translation: Translation, memo: Memo | None = None) -> dict[str, GatewayResources]:
    """Each Gateway's xDS resources (the translation must come from ``Options(per_gateway=True)``).

    ``memo``: Route objects written in an earlier build keep their dicts (:func:`.envoy.output.routes_memo`).
    """
    static = translation.bootstrap.static_resources
    assert static is not None  # the translator always fills it
    clusters = {c.name: output.to_dict(c) for c in static.clusters}
    secrets = {s.name: output.to_dict(s) for s in static.secrets}
    out: dict[str, GatewayResources] = {}
    for key, listeners in translation.gateways:
        res = GatewayResources()
        for listener in listeners:
            with output.routes_memo(memo):
                body = output.to_dict(listener)
            for chain in body.get("filter_chains", []):
                for flt in chain.get("filters", []):
                    _route_by_name(flt, res)
                _secrets_by_ads(chain)
            res.by_type[LISTENER][body["name"]] = body
        named = set(_strings(res.by_type[LISTENER])) | _table_strings(res.by_type[ROUTES], memo)
        for name in sorted(named & clusters.keys()):
            cluster, endpoints = _discovered(clusters[name])
            res.by_type[CLUSTER][name] = cluster
            if endpoints is not None:
                res.by_type[ENDPOINTS][name] = endpoints
        for name in sorted(named & secrets.keys()):
            res.by_type[SECRET][name] = secrets[name]
        out[group_name(key)] = res
    return out


def _route_by_name(flt: dict[str, Any], res: GatewayResources) -> None:
    """An HCM's inline route table becomes an RDS resource of the same name."""
    config = flt.get("typed_config")
    if not isinstance(config, dict) or config.get("@type") != _HCM or "route_config" not in config:
        return
    table = config.pop("route_config")
    res.by_type[ROUTES][table["name"]] = table
    config["rds"] = {"config_source": ADS_SOURCE, "route_config_name": table["name"]}


def _secrets_by_ads(chain: dict[str, Any]) -> None:
    socket = chain.get("transport_socket")
    config = socket.get("typed_config") if isinstance(socket, dict) else None
    if not isinstance(config, dict) or config.get("@type") != _TLS:
        return
    for ref in config.get("common_tls_context", {}).get("tls_certificate_sds_secret_configs", []):
        ref["sds_config"] = ADS_SOURCE


def _discovered(cluster: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """An EDS cluster and its endpoints, when every endpoint is an IP address; a cluster that
    resolves a DNS name (a Service without ``--endpoints``) stays as it is."""
    assignment = cluster.get("load_assignment")
    if not assignment or not all(_is_ip(a) for a in _addresses(assignment)):
        return cluster, None
    eds = {k: v for k, v in cluster.items() if k not in ("load_assignment", "type", "dns_lookup_family")}
    eds["type"] = "EDS"
    eds["eds_cluster_config"] = {"eds_config": ADS_SOURCE}
    return eds, assignment


def _addresses(assignment: Mapping[str, Any]) -> Iterator[str]:
    for locality in assignment.get("endpoints", []):
        for lb in locality.get("lb_endpoints", []):
            yield lb.get("endpoint", {}).get("address", {}).get("socket_address", {}).get("address", "")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _table_strings(tables: Mapping[str, Any], memo: Memo | None) -> set[str]:
    """The strings of route tables; a route's (the same dict as last build when it did not
    change) are collected once across builds."""
    found: set[str] = set()
    for table in tables.values():
        for vh in table.get("virtual_hosts", []):
            found.update(_strings({k: v for k, v in vh.items() if k != "routes"}))
            for entry in vh.get("routes", []):
                if memo is None:
                    found.update(_strings(entry))
                    continue
                key = ("strings", id(entry))
                hit = memo.get(key)
                if hit is None or hit[0] is not entry:
                    hit = (entry, frozenset(_strings(entry)))
                    memo.put(key, hit)
                found.update(hit[1])
        found.update(_strings({k: v for k, v in table.items() if k != "virtual_hosts"}))
    return found


def _strings(value: Any) -> Iterator[str]:
    """Every string in a proto-JSON tree (names refer to clusters and secrets by value)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


_MESSAGES: dict[str, type[Message]] = {}
_IMPORTED: set[str] = set()


def to_message(type_url: str, body: Mapping[str, Any]) -> Message:
    """Parse proto-JSON into the xds-protos message of ``type_url``."""
    _import_packed(body)
    cls = _message_class(type_url)
    message = cls()
    json_format.ParseDict(body, message)
    return message


def _route_table(type_url: str, body: Mapping[str, Any], memo: Memo) -> Message:
    """A RouteConfiguration whose routes are parsed once each across builds: the table is parsed
    without its routes, then each route dict (the same object as last build when the route did
    not change) is taken from ``memo`` or parsed."""
    hosts = body.get("virtual_hosts", [])
    shell = {**body, "virtual_hosts": [{**vh, "routes": []} for vh in hosts]}
    table = to_message(type_url, shell)
    route_url = "type.googleapis.com/envoy.config.route.v3.Route"
    for vh_message, vh in zip(table.virtual_hosts, hosts, strict=True):
        for entry in vh.get("routes", []):
            hit = memo.get(id(entry))
            if hit is None or hit[0] is not entry:
                hit = (entry, to_message(route_url, entry))
                memo.put(id(entry), hit)
            vh_message.routes.append(hit[1])
    return table


def _message_class(type_url: str) -> type[Message]:
    cls = _MESSAGES.get(type_url)
    if cls is None:
        full_name = type_url.rsplit("/", 1)[1]
        _import_package(full_name.rsplit(".", 1)[0])
        from google.protobuf import symbol_database

        cls = symbol_database.Default().GetSymbol(full_name)
        _MESSAGES[type_url] = cls
    return cls


def _import_packed(value: Any) -> None:
    """Import the module of every ``@type`` in ``value`` (json_format needs their descriptors)."""
    if isinstance(value, dict):
        packed = value.get("@type")
        if isinstance(packed, str):
            _import_package(packed.rsplit("/", 1)[1].rsplit(".", 1)[0])
        for item in value.values():
            _import_packed(item)
    elif isinstance(value, list):
        for item in value:
            _import_packed(item)


def _import_package(package: str) -> None:
    """Every generated module of a proto package (``envoy.extensions.filters.http.ext_authz.v3``)."""
    if package in _IMPORTED:
        return
    _IMPORTED.add(package)
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")
