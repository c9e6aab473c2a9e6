"""TLS and mTLS on the gRPC port, and certificate rotation without a restart."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extsvc.plugin.host import PluginHost
from extsvc.testing import authz_stub, check_request, running_server

from .conftest import Proc

CONFIG = "default_policy: p\npolicies:\n  p:\n    steps: [{plugin: allow}]\n"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


class CA:
    """A throwaway certificate authority."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(self._name, self._key.public_key(), self._name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, client: bool = False) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, key.public_key(), self._name)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return Pem(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def write_pki(directory: Path, who: str) -> dict[str, Path]:
    """A server CA and certificate (for localhost) and a client CA and certificate (for Envoy),
    written into ``directory``: file name -> path (server-ca.crt, client-ca.crt, server.crt,
    server.key, client.crt, client.key). ``who`` names the CAs."""
    server_ca, client_ca = CA(f"{who} test server CA"), CA(f"{who} test client CA")
    server, client = server_ca.issue("localhost"), client_ca.issue("envoy", client=True)
    files = {
        "server-ca.crt": server_ca.pem, "client-ca.crt": client_ca.pem,
        "server.crt": server.cert, "server.key": server.key,
        "client.crt": client.cert, "client.key": client.key,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name: directory / name for name in files}


def _builder(subject: x509.Name, public_key: Any, issuer: x509.Name) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path

    def install(self, server: Pem, *, bump: int = 0) -> None:
        """Write a server certificate the way a rotation does: new files, a new mtime."""
        for path, data in ((self.cert, server.cert), (self.key, server.key)):
            tmp = path.with_name(path.name + ".new")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump))


@pytest.fixture(scope="module")
def server_ca() -> CA:
    return CA("extsvc test server CA")


@pytest.fixture(scope="module")
def client_ca() -> CA:
    return CA("extsvc test client CA")


@pytest.fixture
def tls(tmp_path: Path, server_ca: CA, client_ca: CA) -> TlsFiles:
    files = TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "client-ca.crt")
    files.install(server_ca.issue("extsvc"))
    files.client_ca.write_bytes(client_ca.pem)
    return files


async def secure_check(port: int, trust: bytes, client: Pem | None = None) -> Any:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trust,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),  # a new connection (and handshake) per channel
    ]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        return await authz_stub(channel).Check(check_request(), timeout=5)


async def test_tls(host: PluginHost, tmp_path: Path, tls: TlsFiles, server_ca: CA) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text(CONFIG)
    async with running_server(
        config, host=host, tls_cert_file=tls.cert, tls_key_file=tls.key
    ) as server:
        response = await secure_check(server.grpc_port, server_ca.pem)
        assert response.status.code == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await authz_stub(plaintext).Check(check_request(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_trusted_certificate(
    host: PluginHost, tmp_path: Path, tls: TlsFiles, server_ca: CA, client_ca: CA
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text(CONFIG)
    async with running_server(
        config, host=host,
        tls_cert_file=tls.cert, tls_key_file=tls.key, tls_client_ca_file=tls.client_ca,
    ) as server:
        port = server.grpc_port
        response = await secure_check(port, server_ca.pem, client_ca.issue("envoy", client=True))
        assert response.status.code == 0

        for stranger in (None, CA("someone else").issue("envoy", client=True)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await secure_check(port, server_ca.pem, stranger)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_certificate_is_served_without_a_restart(
    host: PluginHost, tmp_path: Path, tls: TlsFiles, server_ca: CA
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text(CONFIG)
    async with running_server(
        config, host=host, tls_cert_file=tls.cert, tls_key_file=tls.key
    ) as server:
        port = server.grpc_port
        assert (await secure_check(port, server_ca.pem)).status.code == 0

        rotated = CA("the next server CA")
        tls.install(rotated.issue("extsvc"), bump=1_000_000)
        assert (await secure_check(port, rotated.pem)).status.code == 0
        with pytest.raises(grpc.aio.AioRpcError):  # the old certificate is gone
            await secure_check(port, server_ca.pem)


def test_serve_with_mtls_flags(
    spawn: Callable[..., Proc], tmp_path: Path, tls: TlsFiles, server_ca: CA, client_ca: CA
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text(CONFIG)
    proc = spawn(
        "--config", str(config),
        "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
        "--tls-client-ca", str(tls.client_ca),
    )
    proc.wait_ready()
    client = client_ca.issue("envoy", client=True)
    options = [("grpc.ssl_target_name_override", "localhost")]
    target = f"127.0.0.1:{proc.grpc_port}"

    trusted = grpc.ssl_channel_credentials(server_ca.pem, client.key, client.cert)
    with grpc.secure_channel(target, trusted, options) as channel:
        assert authz_stub(channel).Check(check_request(), timeout=5).status.code == 0

    anonymous = grpc.ssl_channel_credentials(server_ca.pem)
    with grpc.secure_channel(target, anonymous, options) as channel, pytest.raises(grpc.RpcError):
        authz_stub(channel).Check(check_request(), timeout=5)
    assert "mTLS" in proc.log
