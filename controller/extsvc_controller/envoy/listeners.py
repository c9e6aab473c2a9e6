"""Listeners, filter chains (TLS), secrets and the bootstrap."""

from __future__ import annotations

from collections.abc import Sequence

import betterproto2
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    TransportSocket,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, FilterChainMatch, Listener
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    Secret,
    TlsCertificate,
)

from .clusters import address
from .packing import pack


def filter_chain(
    hcm: Filter, *, server_names: Sequence[str] = (), secret_names: Sequence[str] = (), name: str = ""
) -> FilterChain:
    socket = None
    match = None
    if secret_names:
        tls = DownstreamTlsContext(
            common_tls_context=CommonTlsContext(
                tls_certificate_sds_secret_configs=[SdsSecretConfig(name=s) for s in secret_names]
            )
        )
        socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(tls))
        match = FilterChainMatch(server_names=list(server_names)) if server_names else None
    return FilterChain(name=name, filters=[hcm], transport_socket=socket, filter_chain_match=match)


def listener(name: str, host: str, port: int, chains: Sequence[FilterChain]) -> Listener:
    tls = any(c.transport_socket is not None for c in chains)
    filters = []
    if tls:
        from envoy_data_plane.envoy.config.listener.v3 import ListenerFilter

        inspector = _tls_inspector()
        filters = [ListenerFilter(name="envoy.filters.listener.tls_inspector", typed_config=pack(inspector))]
    return Listener(
        name=name, address=address(host, port), filter_chains=list(chains), listener_filters=filters
    )


def _tls_inspector() -> betterproto2.Message:
    from envoy_data_plane.envoy.extensions.filters.listener.tls_inspector.v3 import TlsInspector

    return TlsInspector()


def tls_secret(name: str, cert_pem: bytes, key_pem: bytes) -> Secret:
    """A certificate inlined in the bootstrap (``render`` without ``--secret-dir``)."""
    return Secret(
        name=name,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(inline_bytes=cert_pem),
            private_key=DataSource(inline_bytes=key_pem),
        ),
    )


def tls_secret_files(name: str, cert_path: str, key_path: str) -> Secret:
    """A certificate Envoy reads from files (the bootstrap refers to the key, never holds it)."""
    return Secret(
        name=name,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(filename=cert_path),
            private_key=DataSource(filename=key_path),
        ),
    )


def bootstrap(
    admin: tuple[str, int],
    listeners: Sequence[Listener],
    clusters: Sequence[Cluster],
    secrets: Sequence[Secret],
) -> Bootstrap:
    return Bootstrap(
        admin=Admin(address=address(*admin)),
        static_resources=BootstrapStaticResources(
            listeners=list(listeners), clusters=list(clusters), secrets=list(secrets)
        ),
    )
