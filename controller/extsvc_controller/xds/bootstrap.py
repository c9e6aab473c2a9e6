"""The minimal Envoy bootstrap that takes everything else from the controller's ADS server.

Why each part is there (Envoy 1.40):

* ``node.id`` and ``node.cluster`` are both required with ADS (Envoy exits without them); the
  cluster and ``metadata.gateway`` are the Gateway, which is how the server finds the group;
* ``set_node_on_first_message_only``: otherwise every request repeats the node (~60 KB);
* the xds cluster needs an HTTP/2 setting (``typed_extension_protocol_options``) or Envoy never
  sends a request; its ``connection_keepalive`` makes Envoy notice a dead server, at an interval
  the server accepts (``XdsServerSettings.min_client_ping_interval_ms``);
* with ``tls``, the connection to the server is mutual TLS, offering ALPN ``h2`` as gRPC expects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from .cache import parse_group

__all__ = ["XDS_CLUSTER", "XdsTls", "ads_bootstrap"]

XDS_CLUSTER = "xds_cluster"
_V3 = "V3"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@dataclass(frozen=True)
class XdsTls:
    """Files for mutual TLS to the ADS server: the CA that signed it, Envoy's certificate and key."""

    ca_file: str
    cert_file: str
    key_file: str


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def ads_bootstrap(
    node_id: str,
    gateway: str,
    xds_host: str,
    xds_port: int,
    *,
    admin: tuple[str, int] = ("127.0.0.1", 9901),
    delta: bool = False,
    tls: XdsTls | tuple[str, str, str] | None = None,
    keepalive_interval_s: int = 30,
) -> dict[str, Any]:
    """A bootstrap (plain dict, admin first; dump it as YAML or JSON) for one Envoy of ``gateway``.

    :param gateway: ``"<namespace>/<name>"`` of the Gateway this Envoy serves (its group).
    :param delta: incremental xDS (``DELTA_GRPC``) instead of state of the world (``GRPC``).
    :param tls: ``(ca_file, cert_file, key_file)`` for mutual TLS to the server, or None.
    """
    if parse_group(gateway) is None:
        raise ValueError(f"gateway must be '<namespace>/<name>', got {gateway!r}")
    if not node_id:
        raise ValueError("node_id must not be empty")
    ads_source = {"ads": {}, "resource_api_version": _V3}
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(xds_host, xds_port)}}]}],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": f"{keepalive_interval_s}s", "timeout": "5s"}
                    }
                },
            }
        },
    }
    if tls is not None:
        files = tls if isinstance(tls, XdsTls) else XdsTls(*tls)
        context: dict[str, Any] = {
            "@type": _TLS_CONTEXT,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [{
                    "certificate_chain": {"filename": files.cert_file},
                    "private_key": {"filename": files.key_file},
                }],
                "validation_context": {"trusted_ca": {"filename": files.ca_file}},
            },
        }
        if not _is_ip(xds_host):
            context["sni"] = xds_host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": context}
    return {
        "admin": {"address": _socket_address(*admin)},
        "node": {"id": node_id, "cluster": gateway, "metadata": {"gateway": gateway}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": _V3,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": dict(ads_source),
        },
        "static_resources": {"clusters": [cluster]},
    }
