"""The README's quick start: docs/envoy/ext-authz.yaml in front of `extsvc serve` on the demo policy."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from extsvc.testing.harness import EnvoyProcess, ExtsvcProcess

from .conftest import ROOT, StartEnvoy


@pytest.fixture(scope="module")
def demo_envoy(start_envoy: StartEnvoy) -> Iterator[EnvoyProcess]:
    with ExtsvcProcess(None) as server:  # no --config: the embedded demo policy
        yield start_envoy(ROOT / "docs" / "envoy" / "ext-authz.yaml", server.grpc_port)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/public/", {}, 200),
        ("/admin", {}, 403),
        ("/", {}, 401),
        ("/", {"x-demo-user": "ann"}, 200),
        ("/open/anything", {}, 200),     # the route's context_extensions pick allow-all
        ("/healthz", {}, 200),           # ext_authz disabled on this route
    ],
)
def test_quick_start_answers(
    demo_envoy: EnvoyProcess, path: str, headers: dict[str, str], status: int
) -> None:
    response = httpx.get(demo_envoy.url(path), headers=headers)
    assert response.status_code == status, response.text


def test_quick_start_tags_allowed_requests(demo_envoy: EnvoyProcess) -> None:
    response = httpx.get(demo_envoy.url("/"), headers={"x-demo-user": "ann"})
    assert response.headers["x-extsvc"] == "demo"
    assert response.json()["headers"]["x-extsvc-policy"] == "demo"
    denied = httpx.get(demo_envoy.url("/"))
    assert denied.headers["www-authenticate"] == 'Demo realm="extsvc"'
