"""The README's quick start: docs/envoy/ext-authz.yaml in front of `extsvc serve` on the demo policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, wait_until

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


def uncomment_open_route(config: str) -> str:
    """The config with its commented-out ``/open`` route example switched on."""
    lines = config.splitlines()
    start = lines.index("              # - name: open")
    end = next(i for i in range(start, len(lines)) if "context_extensions" in lines[i]) + 1
    for i in range(start, end):
        lines[i] = lines[i].replace("# ", "", 1)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", ["ext-authz.yaml", "all-services.yaml"])
def test_the_commented_route_example_names_a_policy(
    start_envoy: StartEnvoy, tmp_path: Path, name: str
) -> None:
    config = uncomment_open_route((ROOT / "docs" / "envoy" / name).read_text(encoding="utf-8"))
    with ExtsvcProcess(None) as server:
        envoy = start_envoy(config, server.grpc_port)
        assert httpx.get(envoy.url("/open/anything")).status_code == 200  # allow-all
        assert httpx.get(envoy.url("/elsewhere")).status_code == 401  # the default policy


OWN_POLICIES = """
# a user's own file: other policy names, no extproc section, no rate-limit section
default_policy: members
policies:
  members:
    steps:
      - plugin: header-match
        config:
          match: {headers: [{name: x-member, present: true}]}
          on_match: allow
          reply: {status: 403, body: "members only\n"}
"""


@pytest.mark.parametrize("name", ["ext-authz.yaml", "all-services.yaml"])
def test_the_shipped_envoy_configs_work_with_any_policy_file(
    start_envoy: StartEnvoy, backend: EchoBackend, tmp_path: Path, name: str
) -> None:
    own = tmp_path / "own.yaml"
    own.write_text(OWN_POLICIES, encoding="utf-8")
    with ExtsvcProcess(own) as server:
        envoy = start_envoy(ROOT / "docs" / "envoy" / name, server.grpc_port)
        allowed = httpx.get(envoy.url("/anything"), headers={"x-member": "yes"})
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["path"] == "/anything"
        assert httpx.get(envoy.url("/anything")).status_code == 403
        if name == "all-services.yaml":
            # ext_proc has no policy to run: the stream passes through, counted as such
            assert "x-extsvc-processed" not in allowed.headers
            wait_until(
                lambda: server.metric(
                    "extsvc_extproc_streams_total", policy="", outcome="unselected"
                ) >= 1,
                5, "the pass-through stream to be counted",
            )
        # start-up said what requests that name no policy get
        assert "extproc: no policies: ext_proc streams pass through unprocessed" in server.log()
