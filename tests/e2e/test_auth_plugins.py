"""The authentication plugins through a real Envoy: JWT against a live JWKS endpoint, and API keys."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess
from unit.authkit import IdpServer, public_jwk, rsa_key, token

from .conftest import HERE, StartEnvoy

API_KEY = "k-4f9c2e7d1b8a6035"

POLICY = """
version: 1
default_policy: jwt-or-key
policies:
  jwt-or-key:
    combine: any-allow
    steps:
      - plugin: jwt
        config:
          providers:
            - name: idp
              issuers: [https://idp.test]
              audiences: [orders]
              algorithms: [RS256]
              jwks_url: {jwks_url}
          forward: {{headers: {{x-user: sub}}, metadata: {{user: sub}}}}
          remove_credential: true
      - plugin: api-key
        config:
          keys_file: {keys_file}
          sources: [{{header: x-api-key}}]
          forward: {{headers: {{x-client-id: client_id}}}}
          remove_credential: true
"""


@pytest.fixture(scope="module")
def idp() -> Iterator[IdpServer]:
    server = IdpServer()
    server.state.jwks = {"keys": [public_jwk(rsa_key(), "k1", "RS256")]}
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_envoy(
    start_envoy: StartEnvoy, idp: IdpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    workdir = tmp_path_factory.mktemp("auth")
    keys = workdir / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": API_KEY, "client_id": "billing-job"}]}))
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(jwks_url=idp.jwks_url, keys_file=keys))
    with ExtsvcProcess(policy) as server:
        yield start_envoy(HERE / "envoy-authz.yaml", server.grpc_port)


def upstream_headers(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    headers: dict[str, str] = response.json()["headers"]
    return headers


def test_valid_jwt_reaches_the_backend_as_its_subject(auth_envoy: EnvoyProcess) -> None:
    response = httpx.get(
        auth_envoy.url("/orders"),
        headers={"authorization": f"Bearer {token()}", "x-user": "mallory"},
    )
    headers = upstream_headers(response)
    assert headers["x-user"] == "alice"          # the token's sub, not the client's header
    assert "authorization" not in headers        # remove_credential


@pytest.mark.parametrize(
    ("credential", "challenge"),
    [
        ({}, 'Bearer realm="extsvc"'),
        ({"authorization": "Bearer " + token(exp=1_000_000)}, 'error="invalid_token"'),
        ({"authorization": "Bearer " + token(aud="someone-else")}, 'error="invalid_token"'),
        ({"authorization": "Bearer " + token(rsa_key("other"))}, 'error="invalid_token"'),
        ({"authorization": "Bearer not.a.jwt"}, 'error="invalid_token"'),
    ],
    ids=["missing", "expired", "wrong-audience", "wrong-key", "garbage"],
)
def test_bad_or_missing_jwt_is_a_401_with_a_challenge(
    auth_envoy: EnvoyProcess, backend: EchoBackend, credential: dict[str, str], challenge: str
) -> None:
    before = len(backend.requests)
    response = httpx.get(auth_envoy.url("/orders"), headers=credential)
    assert response.status_code == 401
    assert challenge in response.headers["www-authenticate"]
    assert len(backend.requests) == before


def test_api_key_lets_in_with_its_client_id_and_no_forged_identity(
    auth_envoy: EnvoyProcess,
) -> None:
    response = httpx.get(
        auth_envoy.url("/orders"), headers={"x-api-key": API_KEY, "x-user": "mallory"}
    )
    headers = upstream_headers(response)
    assert headers["x-client-id"] == "billing-job"
    assert "x-api-key" not in headers             # remove_credential
    assert "x-user" not in headers                # an identity header the API key did not set


# (A trailing newline cannot cross HTTP at all; the unit attack suite covers it.)
@pytest.mark.parametrize("key", [API_KEY.upper(), API_KEY[:-1], API_KEY + "0", ""])
def test_api_key_variants_are_refused(auth_envoy: EnvoyProcess, key: str) -> None:
    assert httpx.get(auth_envoy.url("/orders"), headers={"x-api-key": key}).status_code == 401


def test_jwks_endpoint_down_cached_keys_keep_working(
    auth_envoy: EnvoyProcess, idp: IdpServer
) -> None:
    idp.stop()  # last test of the module to use the IdP
    response = httpx.get(auth_envoy.url("/orders"), headers={"authorization": f"Bearer {token()}"})
    assert upstream_headers(response)["x-user"] == "alice"
