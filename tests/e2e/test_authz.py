"""ext_authz through a real Envoy 1.40: what a client and the backend really see."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port, wait_until

from .conftest import HERE, StartEnvoy


def echo(response: httpx.Response) -> dict[str, object]:
    assert response.headers.get("content-type") == "application/json", response.text
    data: dict[str, object] = json.loads(response.text)
    return data


def test_allow_reaches_the_backend_with_upstream_mutations(authz_envoy: EnvoyProcess) -> None:
    response = httpx.get(
        authz_envoy.url("/orders?secret=s3&keep=1"),
        headers={"x-user": "ann", "x-trace": "client", "x-secret": "hunter2"},
    )
    assert response.status_code == 200
    seen = echo(response)
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["x-authz"] == "members"            # set
    assert headers["x-trace"] == "client,authz"       # appended to the existing value
    assert "x-secret" not in headers                  # removed before going upstream
    # Query mutation: `secret` removed, `added` set, `keep` kept (Envoy re-serialises the query).
    path = str(seen["path"])
    assert path.startswith("/orders?")
    assert sorted(path.split("?", 1)[1].split("&")) == ["added=1", "keep=1"]


def test_append_to_a_missing_header_adds_nothing(authz_envoy: EnvoyProcess) -> None:
    # docs/internals/envoy-behaviour.md §1.4: `append: true` on a request header that does not exist is
    # dropped.
    seen = echo(httpx.get(authz_envoy.url("/"), headers={"x-user": "ann"}))
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert "x-trace" not in headers


def test_response_headers_are_added_to_the_backend_reply(authz_envoy: EnvoyProcess) -> None:
    response = httpx.get(authz_envoy.url("/"), headers={"x-user": "ann"})
    assert response.status_code == 200
    assert response.headers["x-extsvc"] == "members"
    # Default action appends another line next to the backend's own header.
    assert sorted(response.headers.get_list("x-backend")) == ["authz", "echo"]
    # Dynamic metadata from the Check answer is visible to later parts of Envoy.
    assert response.headers["x-authz-tier"] == "gold"


def test_deny_with_custom_status_body_and_headers(
    authz_envoy: EnvoyProcess, backend: EchoBackend
) -> None:
    before = len(backend.requests)
    response = httpx.get(authz_envoy.url("/private"))
    assert response.status_code == 401
    assert response.text == "who are you?\n"
    assert response.headers["www-authenticate"] == 'Demo realm="e2e"'
    assert response.headers["x-deny-reason"] == "no-user"
    assert len(backend.requests) == before        # never reached the backend


def test_route_picks_its_policy_through_context_extensions(authz_envoy: EnvoyProcess) -> None:
    teapot = httpx.get(authz_envoy.url("/teapot"), headers={"x-user": "ann"})
    assert (teapot.status_code, teapot.text, teapot.headers["x-teapot"]) == (
        418, "short and stout\n", "yes"
    )
    # /open uses the allow-all policy: no x-user needed, and none of `members`' mutations.
    opened = httpx.get(authz_envoy.url("/open"))
    assert opened.status_code == 200
    assert "x-extsvc" not in opened.headers


def test_unknown_policy_is_denied_and_counted(
    authz_envoy: EnvoyProcess, extsvc_authz: ExtsvcProcess
) -> None:
    before = extsvc_authz.metric("extsvc_authz_unknown_policy_total")
    response = httpx.get(authz_envoy.url("/nowhere"), headers={"x-user": "ann"})
    assert response.status_code == 403
    assert extsvc_authz.metric("extsvc_authz_unknown_policy_total") == before + 1
    assert "unknown policy 'no-such-policy'" in extsvc_authz.log()


def test_disabled_route_sends_no_check(authz_envoy: EnvoyProcess) -> None:
    before = authz_envoy.stats("http.ingress_http.ext_authz.")
    assert httpx.get(authz_envoy.url("/healthz")).status_code == 200
    after = authz_envoy.stats("http.ingress_http.ext_authz.")
    assert after == before


def test_decisions_are_counted_by_policy(
    authz_envoy: EnvoyProcess, extsvc_authz: ExtsvcProcess
) -> None:
    before = extsvc_authz.metric("extsvc_authz_decisions_total", policy="teapot", decision="deny")
    httpx.get(authz_envoy.url("/teapot"))
    after = extsvc_authz.metric("extsvc_authz_decisions_total", policy="teapot", decision="deny")
    assert after == before + 1
    envoy_denied = authz_envoy.stats("http.ingress_http.ext_authz.denied")
    assert envoy_denied["http.ingress_http.ext_authz.denied"] >= 1


def test_server_down_gives_envoys_status_on_error(start_envoy: StartEnvoy) -> None:
    nobody = free_port()  # nothing listens here
    envoy = start_envoy(HERE / "envoy-authz.yaml", nobody)
    response = httpx.get(envoy.url("/"), headers={"x-user": "ann"})
    assert response.status_code == 503  # status_on_error in envoy-authz.yaml
    assert envoy.stats("http.ingress_http.ext_authz.error")["http.ingress_http.ext_authz.error"] >= 1


def test_not_ready_before_the_first_good_config(start_envoy: StartEnvoy, tmp_path: Path) -> None:
    policy = tmp_path / "policies.yaml"
    policy.write_text("version: 1\npolicies: {open: {steps: [{plugin: no-such-kind}]}}\n")
    with ExtsvcProcess(policy, args=["--reload-interval", "0.1"], wait_ready=False) as server:
        envoy = start_envoy(HERE / "envoy-authz.yaml", server.grpc_port)
        assert server.admin("/readyz")[0] == 503
        # Reachable, but with no config it answers as an error: Envoy applies status_on_error.
        assert httpx.get(envoy.url("/open")).status_code == 503
        assert server.metric("extsvc_config_reloads_total", result="error") >= 1

        shutil.copy(HERE / "authz-policies.yaml", policy)
        wait_until(lambda: server.admin("/readyz")[0] == 200, 10, "extsvc ready")
        assert httpx.get(envoy.url("/open")).status_code == 200


@pytest.mark.slow
def test_reload_under_traffic_fails_no_request(start_envoy: StartEnvoy, tmp_path: Path) -> None:
    policy = tmp_path / "policies.yaml"
    template = (
        "version: 1\ndefault_policy: p\npolicies:\n  p:\n    steps:\n"
        "      - plugin: set-headers\n"
        "        config: {{response: [{{name: x-generation, value: 'g{n}', action: overwrite}}]}}\n"
    )
    policy.write_text(template.format(n=0))
    with ExtsvcProcess(policy, args=["--reload-interval", "0.1"]) as server:
        envoy = start_envoy(HERE / "envoy-authz.yaml", server.grpc_port)
        statuses: list[int] = []
        generations: set[str] = set()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client() as http:
                while not stop.is_set():
                    response = http.get(envoy.url("/"))
                    statuses.append(response.status_code)
                    generations.add(response.headers.get("x-generation", "-"))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            for n in range(1, 6):
                time.sleep(0.4)
                policy.write_text(template.format(n=n))
            wait_until(lambda: "g5" in generations, 10, "the last config to serve")
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert len(statuses) > 50
        assert set(statuses) == {200}, f"failed requests during reloads: {sorted(set(statuses))}"
        assert "-" not in generations
        assert server.metric("extsvc_config_reloads_total", result="ok") >= 6
