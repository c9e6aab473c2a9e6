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
@pytest.mark.parametrize("envoy_fixture", ["demo_envoy", "all_services_envoy"])
def test_quick_start_answers(
    request: pytest.FixtureRequest, envoy_fixture: str, path: str, headers: dict[str, str], status: int
) -> None:
    envoy: EnvoyProcess = request.getfixturevalue(envoy_fixture)
    response = httpx.get(envoy.url(path), headers=headers)
    assert response.status_code == status, response.text


def test_quick_start_tags_allowed_requests(demo_envoy: EnvoyProcess) -> None:
    response = httpx.get(demo_envoy.url("/"), headers={"x-demo-user": "ann"})
    assert response.headers["x-extsvc"] == "demo"
    assert response.json()["headers"]["x-extsvc-policy"] == "demo"
    denied = httpx.get(demo_envoy.url("/"))
    assert denied.headers["www-authenticate"] == 'Demo realm="extsvc"'


@pytest.fixture(scope="module")
def all_services_envoy(start_envoy: StartEnvoy) -> Iterator[EnvoyProcess]:
    with ExtsvcProcess(None) as server:
        yield start_envoy(ROOT / "docs" / "envoy" / "all-services.yaml", server.grpc_port)


def test_all_services_demo_authorizes_processes_and_limits(all_services_envoy: EnvoyProcess) -> None:
    envoy = all_services_envoy
    user = {"x-demo-user": "zoe"}
    first = httpx.get(envoy.url("/"), headers=user)
    assert first.status_code == 200
    # ext_authz (the demo policy) tagged the request; ext_proc tagged the response.
    assert first.json()["headers"]["x-extsvc-policy"] == "demo"
    assert first.headers["x-extsvc-processed"] == "true"
    # The rate limit: 5 a minute per x-demo-user (extsvc/default_ratelimit.yaml).
    assert first.headers["x-ratelimit-limit"].startswith("5,")
    assert first.headers["x-ratelimit-remaining"] == "4"
    statuses = [httpx.get(envoy.url("/"), headers=user).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    # Another user has a budget of their own.
    assert httpx.get(envoy.url("/"), headers={"x-demo-user": "yan"}).status_code == 200
    # Denied by ext_authz before the rate limit is asked: no rate-limit headers.
    denied = httpx.get(envoy.url("/"))
    assert denied.status_code == 401
    assert "x-ratelimit-limit" not in denied.headers
