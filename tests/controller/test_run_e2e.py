"""End to end, live: ``extsvc-controller run`` on a folder of manifests feeds a real Envoy 1.40 over
ADS (its bootstrap from ``render --xds``), in front of a real ``extsvc serve`` and an echo
backend; editing a manifest changes what Envoy does, without a restart."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port
from extsvc_controller.cli import main
from extsvc_controller.render import load_endpoints
from extsvc_controller.serve import RunConfig, Running, XdsServerTls

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "controller"


def distinct_ports(n: int) -> list[int]:
    """``n`` different free ports, taken after every other server of the test has bound its own
    (a port free_port() just gave out can be handed out again to the next bind to port 0)."""
    found: list[int] = []
    while len(found) < n:
        port = free_port()
        if port not in found:
            found.append(port)
    return found


def example_endpoints(tmp_path: Path, extsvc_port: int, backend_port: int, listen: int) -> Path:
    """The ``--endpoints`` file that puts the example's Services and port 80 on loopback."""
    path = tmp_path / "endpoints.yaml"
    path.write_text(
        f"services:\n  demo/extsvc: 127.0.0.1:{extsvc_port}\n  demo/backend: 127.0.0.1:{backend_port}\n"
        f"listeners:\n  '80': 127.0.0.1:{listen}\n"
    )
    return path


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def pki(directory: Path) -> dict[str, Path]:
    """A server certificate for the ADS server and a client certificate for Envoy."""
    from service.test_tls import write_pki

    return write_pki(directory, "controller")


@pytest.mark.parametrize("mode", ["sotw", "delta", "sotw-mtls"])
async def test_a_folder_edit_reaches_envoy_over_ads(tmp_path: Path, mode: str) -> None:
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLE / "manifests", folder)
    files = pki(tmp_path) if mode.endswith("mtls") else {}
    with EchoBackend() as backend, ExtsvcProcess(EXAMPLE / "extsvc.yaml") as extsvc:
        listen, xds, admin, envoy_admin = distinct_ports(4)
        endpoints = example_endpoints(tmp_path, extsvc.grpc_port, backend.port, listen)
        running = Running(RunConfig(
            paths=[folder],
            options=load_endpoints(endpoints),
            xds_address=("127.0.0.1", xds),
            xds_tls=XdsServerTls.read(files["server.crt"], files["server.key"], files["client-ca.crt"])
            if files else None,
            admin_address=("127.0.0.1", admin),
            status_file=tmp_path / "status.yaml",
            poll_interval_s=0.05,
            debounce_s=0.02,
        ))
        await running.start()
        try:
            boot = tmp_path / "envoy.yaml"
            argv = ["render", "--xds", f"127.0.0.1:{running.xds_port}", "--gateway", "demo/gw",
                    "--admin", f"127.0.0.1:{envoy_admin}", "-o", str(boot)]
            if mode == "delta":
                argv.append("--delta")
            if files:
                argv += ["--xds-ca", str(files["server-ca.crt"]), "--xds-cert", str(files["client.crt"]),
                         "--xds-key", str(files["client.key"])]
            assert main(argv) == 0
            proxy = EnvoyProcess(boot.read_text())
            proxy.port = listen  # the listener comes over LDS; the bootstrap only names the server
            # start() polls Envoy's /ready: off the event loop that serves xDS
            await asyncio.to_thread(proxy.start)
            try:
                async with httpx.AsyncClient(base_url=proxy.url("")) as client:
                    denied = await client.get("/anything")
                    assert denied.status_code == 401, denied.text  # ext_authz, Gateway-wide
                    ok = await client.get("/anything", headers={"x-user": "ann"})
                    assert ok.status_code == 200 and backend.requests[-1].headers["x-extproc"] == "on"
                    # the Gateway-wide extAuth goes away in the manifests: Envoy lets them in
                    policies = folder / "policies.yaml"
                    text = policies.read_text()
                    policies.write_text(text.replace(
                        "  extAuth:\n    extensionRef: {name: authz}\n"
                        "    contextExtensions: {extsvc-policy: members}\n", ""
                    ))

                    async def open_now() -> bool:
                        # /anything: rule `rest`, no rate limit (/orders has 3 an hour)
                        return (await client.get("/anything")).status_code == 200

                    await eventually(open_now, 20, "the edit reached Envoy")
                    # a manifest that cannot be read keeps the last good config serving
                    (folder / "broken.yaml").write_text("kind: [unclosed\n")
                    await asyncio.sleep(0.5)
                    assert (await client.get("/anything")).status_code == 200
                    assert running.cache.nodes.all(), "the Envoy is connected"
            finally:
                await asyncio.to_thread(proxy.stop)
            assert "kind: HTTPRoute" in (tmp_path / "status.yaml").read_text()
        finally:
            await running.stop()


async def test_an_edit_through_the_kubernetes_api_reaches_envoy(tmp_path: Path) -> None:
    """Kubernetes mode end to end: objects in an emulated API server (kmock), the controller
    watching it, a real Envoy over ADS; a merge-patch to a TrafficPolicy changes what Envoy does,
    and the route's status is written back."""
    from extsvc_controller.kube import kinds as k

    from .kube_kit import emulated_cluster, kubeconfig, seed, until

    with EchoBackend() as backend, ExtsvcProcess(EXAMPLE / "extsvc.yaml") as extsvc:
        listen, xds, admin, envoy_admin = distinct_ports(4)
        endpoints = example_endpoints(tmp_path, extsvc.grpc_port, backend.port, listen)
        async with emulated_cluster() as cluster:
            await seed(cluster)
            running = Running(RunConfig(
                kubernetes=True, kubeconfig=kubeconfig(tmp_path, cluster),
                options=load_endpoints(endpoints), xds_address=("127.0.0.1", xds),
                admin_address=("127.0.0.1", admin), debounce_s=0.02, leader_election=False,
            ))
            await running.start()
            try:
                await until(lambda: running.ready, 15, "ready")
                boot = tmp_path / "envoy.yaml"
                assert main(["render", "--xds", f"127.0.0.1:{running.xds_port}", "--gateway",
                             "demo/gw", "--admin", f"127.0.0.1:{envoy_admin}", "-o", str(boot)]) == 0
                proxy = EnvoyProcess(boot.read_text())
                proxy.port = listen
                await asyncio.to_thread(proxy.start)
                try:
                    async with httpx.AsyncClient(base_url=proxy.url("")) as client:
                        assert (await client.get("/anything")).status_code == 401
                        # the Gateway-wide policy loses its extAuth (merge-patch null deletes):
                        # Envoy lets requests in
                        await cluster.patch(k.TRAFFICPOLICY, "demo", "gateway-wide",
                                            {"spec": {"extAuth": None}})

                        async def open_now() -> bool:
                            return (await client.get("/anything")).status_code == 200

                        await eventually(open_now, 20, "the API edit reached Envoy")
                        assert backend.requests[-1].headers.get("x-extproc") == "on"
                finally:
                    await asyncio.to_thread(proxy.stop)
                await until(
                    lambda: "status" in cluster.stored(k.HTTPROUTE, "demo", "shop"), 10, "status"
                )
            finally:
                await running.stop()


HTTPS_GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: demo}}
spec:
  gatewayClassName: kgateway
  listeners:
  - name: https
    port: 443
    protocol: HTTPS
    hostname: localhost
    tls: {{mode: Terminate, certificateRefs: [{{name: local-cert}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: secure, namespace: demo}}
spec:
  parentRefs: [{{name: edge}}]
  rules: [{{backendRefs: [{{name: backend, port: 8080}}]}}]
"""

TLS_SECRET = """
apiVersion: v1
kind: Secret
metadata: {{name: local-cert, namespace: demo}}
type: kubernetes.io/tls
data: {{tls.crt: {crt}, tls.key: {key}}}
"""


async def test_https_certificates_come_over_sds_and_rotate_without_a_listener_change(
    tmp_path: Path,
) -> None:
    import base64
    import socket
    import ssl

    from service.test_tls import CA

    ca = CA("controller test CA")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLE / "manifests", folder)
    (folder / "edge.yaml").write_text(HTTPS_GATEWAY.format())

    def write_secret() -> bytes:
        issued = ca.issue("localhost")
        b64 = [base64.b64encode(x).decode() for x in (issued.cert, issued.key)]
        (folder / "secret.yaml").write_text(TLS_SECRET.format(crt=b64[0], key=b64[1]))
        return issued.cert

    def served(port: int) -> tuple[bytes, bytes]:
        """The certificate Envoy presents for SNI localhost (PEM), and a GET's status line."""
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"GET /secure HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            status = tls.recv(64).split(b"\r\n", 1)[0]
        assert der is not None
        return ssl.DER_cert_to_PEM_cert(der).encode(), status

    first = write_secret()
    with EchoBackend() as backend:
        listen, xds, admin, envoy_admin = distinct_ports(4)
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(
            f"services:\n  demo/backend: 127.0.0.1:{backend.port}\n"
            f"listeners:\n  '443': 127.0.0.1:{listen}\n"
        )
        running = Running(RunConfig(
            paths=[folder], options=load_endpoints(endpoints), xds_address=("127.0.0.1", xds),
            admin_address=("127.0.0.1", admin), poll_interval_s=0.05, debounce_s=0.02,
        ))
        await running.start()
        try:
            boot = tmp_path / "envoy.yaml"
            assert main(["render", "--xds", f"127.0.0.1:{running.xds_port}", "--gateway",
                         "demo/edge", "--admin", f"127.0.0.1:{envoy_admin}", "-o", str(boot)]) == 0
            proxy = EnvoyProcess(boot.read_text())
            await asyncio.to_thread(proxy.start)  # ready only once the SDS secret arrived
            try:
                snapshot = running.cache.get("demo/edge")
                assert snapshot is not None
                listeners = snapshot.packed["type.googleapis.com/envoy.config.listener.v3.Listener"]
                assert b"PRIVATE KEY" not in b"".join(a.value for a in listeners.values())
                cert, status = await asyncio.to_thread(served, listen)
                assert cert.strip() == first.strip() and status.endswith(b" 200 OK")
                listener_version = snapshot.type_versions[
                    "type.googleapis.com/envoy.config.listener.v3.Listener"
                ]
                second = write_secret()

                async def rotated() -> bool:
                    return (await asyncio.to_thread(served, listen))[0].strip() == second.strip()

                await eventually(rotated, 20, "the new certificate is served")
                after = running.cache.get("demo/edge")
                assert after is not None and after.type_versions[
                    "type.googleapis.com/envoy.config.listener.v3.Listener"
                ] == listener_version  # only the secret changed
            finally:
                await asyncio.to_thread(proxy.stop)
        finally:
            await running.stop()
