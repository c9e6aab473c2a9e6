"""The container image, as scripts/image builds it (buildah, a Debian base made with mmdebstrap):
it starts as a non-root user, answers /readyz and a Check over gRPC, and serves a real Envoy one
allow and one deny. Marked ``image``: it builds the image first (a minute or two; scripts/image
installs buildah and mmdebstrap from Debian's packages where they are missing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extsvc import __version__
from extsvc.testing import check_request
from extsvc.testing.harness import EchoBackend, EnvoyProcess, free_port, http_get, with_ports

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "e2e"
TAG = f"localhost/extsvc:{__version__}"

pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built now from this checkout (reusing the Debian bases of an earlier build)."""
    result = subprocess.run([str(ROOT / "scripts" / "image")], cwd=ROOT, capture_output=True, text=True,
                            check=False, timeout=540)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{TAG} built" in result.stdout
    return TAG


def _buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True).stdout.strip()


class Container:
    """``buildah run`` of the image with the e2e policies at /etc/extsvc/extsvc.yaml, on loopback
    ports (buildah shares the host's network)."""

    def __init__(self, image: str, grpc_port: int, admin_port: int) -> None:
        self.name = _buildah("from", "--quiet", image)
        _buildah("copy", "--quiet", self.name, str(E2E / "authz-policies.yaml"), "/etc/extsvc/extsvc.yaml")
        self.grpc_port, self.admin_port = grpc_port, admin_port
        self.process = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", self.name, "--",
             "extsvc", "serve", "--config", "/etc/extsvc/extsvc.yaml",
             "--grpc-address", f"127.0.0.1:{grpc_port}", "--admin-address", f"127.0.0.1:{admin_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "EXTSVC_DRAIN_DELAY_S": "0"},
        )

    def admin(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                raise AssertionError(f"the container exited: {out}")
            if self.admin("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError("/readyz not 200 in time")

    def close(self) -> None:
        with_group = os.getpgid(self.process.pid)
        os.killpg(with_group, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            self.process.wait(5)
        subprocess.run(["buildah", "rm", self.name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    grpc_port = free_port()
    admin_port = next(p for p in iter(free_port, None) if p != grpc_port)
    running = Container(image, grpc_port, admin_port)
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


def test_the_image_is_small_labelled_and_non_root(image: str) -> None:
    info = json.loads(_buildah("inspect", "--type", "image", image))
    config = info["OCIv1"]["config"]
    assert config["User"] == "10001:10001"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == image.rsplit(":", 1)[1]
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["Cmd"] == ["extsvc", "serve"]
    archive = ROOT / "dist" / f"extsvc-{image.rsplit(':', 1)[1]}.oci.tar"
    assert archive.is_file()
    number, unit = _buildah("images", "--format", "{{.Size}}", image).split()[:2]
    assert unit == "MB" and float(number) < 200, (number, unit)  # the target


def test_it_serves_readyz_and_a_check_as_a_non_root_user(container: Container) -> None:
    status = json.loads(container.admin("/status")[1])
    assert status["event_loop"] == "uvloop" and status["ready"] is True
    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = stub.Check(check_request("/orders", headers={"x-user": "ann"}), timeout=5)
        denied = stub.Check(check_request("/orders"), timeout=5)
    assert allowed.status.code == 0
    assert denied.status.code != 0 and denied.denied_response.status.code == 401
    ps = subprocess.run(["ps", "-o", "user=,args=", "-u", "10001"],
                        capture_output=True, text=True, check=False)
    assert "extsvc serve" in ps.stdout  # the server runs as uid 10001, not root


def test_a_real_envoy_in_front_of_the_image(container: Container) -> None:
    with EchoBackend() as backend:
        config = with_ports((E2E / "envoy-authz.yaml").read_text(), {
            10000: free_port(), 8081: backend.port, 9001: container.grpc_port, 9901: free_port(),
        })
        with EnvoyProcess(config) as envoy:
            allowed = httpx.get(envoy.url("/orders"), headers={"x-user": "ann"})
            denied = httpx.get(envoy.url("/orders"))
    assert allowed.status_code == 200 and json.loads(allowed.content)["headers"]["x-authz"] == "members"
    assert denied.status_code == 401 and denied.text == "who are you?\n"
