"""End to end: render examples/controller/manifests, start Envoy from the result in front of a real
``extsvc serve``, and show over HTTP that each extension acts on the right routes only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import (
    EchoBackend,
    EnvoyProcess,
    ExtsvcProcess,
    free_port,
    wait_for_window_room,
)
from extsvc_controller.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "controller"

pytestmark = pytest.mark.envoy


@pytest.fixture(autouse=True)
def _room_in_the_hour() -> None:
    """These tests count hour windows on the real clock: never across an hour's end."""
    wait_for_window_room(3600)


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnvoyProcess, EchoBackend]]:
    tmp = tmp_path_factory.mktemp("controller-e2e")
    with EchoBackend() as backend, ExtsvcProcess(EXAMPLE / "extsvc.yaml") as extsvc:
        endpoints = tmp / "endpoints.yaml"
        endpoints.write_text(
            f"services:\n  demo/extsvc: 127.0.0.1:{extsvc.grpc_port}\n"
            f"  demo/backend: 127.0.0.1:{backend.port}\n"
            f"listeners:\n  '80': 127.0.0.1:{free_port()}\nadmin: 127.0.0.1:{free_port()}\n"
        )
        out = tmp / "envoy.yaml"
        assert (
            main(
                [
                    "render",
                    "-f",
                    str(EXAMPLE / "manifests"),
                    "--endpoints",
                    str(endpoints),
                    "-o",
                    str(out),
                    "--status",
                    str(tmp / "status.yaml"),
                ]
            )
            == 0
        )
        with EnvoyProcess(out.read_text()) as proxy:
            yield proxy, backend


def test_ext_authz_and_ext_proc_run_on_gateway_routes(envoy: tuple[EnvoyProcess, EchoBackend]) -> None:
    proxy, backend = envoy
    denied = httpx.get(proxy.url("/anything"))
    assert denied.status_code == 401, denied.text  # ext_authz: policy `members` from contextExtensions
    assert denied.text == "who are you?\n"
    ok = httpx.get(proxy.url("/anything"), headers={"x-user": "ann"})
    assert ok.status_code == 200, ok.text
    seen = backend.requests[-1]
    assert seen.headers["x-authz"] == "members"  # set by ext_authz
    assert seen.headers["x-extproc"] == "on"  # set by ext_proc


def test_disabled_route_skips_ext_authz_and_ext_proc(envoy: tuple[EnvoyProcess, EchoBackend]) -> None:
    proxy, backend = envoy
    for _ in range(4):  # and no rate limit on it either
        response = httpx.get(proxy.url("/public/page"))
        assert response.status_code == 200, response.text
        seen = backend.requests[-1]
        assert "x-authz" not in seen.headers and "x-extproc" not in seen.headers


def test_global_rate_limit_only_on_orders(envoy: tuple[EnvoyProcess, EchoBackend]) -> None:
    proxy, _ = envoy
    user = {"x-user": "ann"}
    codes = [httpx.get(proxy.url("/orders"), headers=user).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = httpx.get(proxy.url("/orders"), headers=user)
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-limit"].startswith("2, 2;w=3600")
    assert [httpx.get(proxy.url("/other"), headers=user).status_code for _ in range(4)] == [200] * 4


def test_local_rate_limit_only_on_the_extension_ref_rule(envoy: tuple[EnvoyProcess, EchoBackend]) -> None:
    proxy, _ = envoy
    user = {"x-user": "ann"}
    codes = [httpx.get(proxy.url("/limited"), headers=user).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert httpx.get(proxy.url("/rest"), headers=user).status_code == 200
