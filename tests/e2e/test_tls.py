"""Envoy talks to extsvc over mTLS: the cluster's UpstreamTlsContext against `extsvc serve --tls-*`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import EnvoyProcess, ExtsvcProcess
from service.test_tls import write_pki

from .conftest import HERE, StartEnvoy

CLUSTER = "  - name: extsvc\n    type: STATIC\n"


def with_upstream_tls(config: str, files: dict[str, Path], *, client_cert: bool) -> str:
    """envoy-authz.yaml with TLS (and, with ``client_cert``, a client certificate) to extsvc."""
    certificate = (
        "          tls_certificates:\n"
        f"          - certificate_chain: {{ filename: {files['client.crt']} }}\n"
        f"            private_key: {{ filename: {files['client.key']} }}\n"
    ) if client_cert else ""
    socket = (
        "    transport_socket:\n"
        "      name: envoy.transport_sockets.tls\n"
        "      typed_config:\n"
        '        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n'
        "        sni: localhost\n"
        "        common_tls_context:\n"
        "          alpn_protocols: [h2]\n"
        f"{certificate}"
        "          validation_context:\n"
        f"            trusted_ca: {{ filename: {files['server-ca.crt']} }}\n"
        "            match_typed_subject_alt_names:\n"
        "            - { san_type: DNS, matcher: { exact: localhost } }\n"
    )
    assert config.count(CLUSTER) == 1
    return config.replace(CLUSTER, CLUSTER + socket)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"), "extsvc")


@pytest.fixture(scope="module")
def mtls_extsvc(pki: dict[str, Path]) -> Iterator[ExtsvcProcess]:
    args = ["--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]),
            "--tls-client-ca", str(pki["client-ca.crt"])]
    with ExtsvcProcess(HERE / "authz-policies.yaml", args=args) as server:
        yield server


def test_envoy_with_a_client_certificate_is_served(
    start_envoy: StartEnvoy, mtls_extsvc: ExtsvcProcess, pki: dict[str, Path]
) -> None:
    config = with_upstream_tls((HERE / "envoy-authz.yaml").read_text(), pki, client_cert=True)
    envoy: EnvoyProcess = start_envoy(config, mtls_extsvc.grpc_port)
    allowed = httpx.get(envoy.url("/"), headers={"x-user": "ann"})
    assert allowed.status_code == 200
    assert allowed.json()["headers"]["x-authz"] == "members"
    assert httpx.get(envoy.url("/teapot")).status_code == 418


def test_envoy_without_a_client_certificate_is_refused(
    start_envoy: StartEnvoy, mtls_extsvc: ExtsvcProcess, pki: dict[str, Path]
) -> None:
    config = with_upstream_tls((HERE / "envoy-authz.yaml").read_text(), pki, client_cert=False)
    envoy: EnvoyProcess = start_envoy(config, mtls_extsvc.grpc_port)
    # The handshake fails, so every Check fails: Envoy's status_on_error, never an allow.
    assert httpx.get(envoy.url("/"), headers={"x-user": "ann"}).status_code == 503
