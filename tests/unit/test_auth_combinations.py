"""Authentication steps combined in one policy: "jwt OR api-key" and "jwt AND client-cidr".

Only the identity of the step that allowed goes upstream: identity headers that step did not set
are removed, so neither the client nor another step can put an ``x-user`` in front of the backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from extsvc.authz.convert import to_check_response
from extsvc.authz.pipeline import CompiledPolicy, Outcome
from extsvc.reload.runtime import Runtime
from extsvc.testing import check_context
from extsvc_plugins import jwt_keys

from .authkit import (
    AUDIENCE,
    ISSUER,
    IdpServer,
    bearer,
    idp_server,
    jwks,
    public_jwk,
    rsa_key,
    runtime_of,
    token,
)

API_KEY = "key-of-the-batch-job"


@pytest.fixture(autouse=True)
def _forget_jwks() -> Iterator[None]:
    jwt_keys._LAST_GOOD_JWKS.clear()
    yield
    jwt_keys._LAST_GOOD_JWKS.clear()


@pytest.fixture
def idp() -> Iterator[IdpServer]:
    with idp_server() as server:
        server.state.jwks = jwks(public_jwk(rsa_key(), "k1"))
        yield server


def jwt_step(idp: IdpServer) -> str:
    return f"""
      - plugin: jwt
        config:
          providers:
            - {{name: idp, issuers: ["{ISSUER}"], audiences: [{AUDIENCE}], algorithms: [RS256],
                jwks_url: "{idp.jwks_url}"}}
          forward: {{headers: {{x-user: sub}}, metadata: {{user: sub}}}}
          remove_credential: true"""


@pytest.fixture
async def runtime(idp: IdpServer, tmp_path: Path) -> AsyncIterator[Runtime]:
    (tmp_path / "keys.txt").write_text(f"{API_KEY} batch-job\n")
    built = await runtime_of(f"""
policies:
  jwt-or-key:
    combine: any-allow
    steps:{jwt_step(idp)}
      - plugin: api-key
        config:
          keys_file: "{tmp_path / 'keys.txt'}"
          forward: {{headers: {{x-client-id: client_id}}, metadata: {{client_id: client_id}}}}
          remove_credential: true
  jwt-and-cidr:
    combine: all-must-allow
    steps:{jwt_step(idp)}
      - plugin: client-cidr
        config: {{allow: [10.0.0.0/8]}}
""")
    yield built
    await built.close()


async def evaluate(policy: CompiledPolicy, source: str = "10.0.0.1:5000", **headers: str) -> Outcome:
    deadline = asyncio.get_running_loop().time() + 5
    return await policy.evaluate(check_context("/", headers=headers, source=source), deadline)


# -- jwt OR api-key -------------------------------------------------------------------------------


async def test_jwt_or_api_key_a_token_allows_with_the_token_identity(runtime: Runtime) -> None:
    outcome = await evaluate(runtime.policies["jwt-or-key"], **bearer(token()), **{"x-client-id": "forged"})
    assert (outcome.label, outcome.step) == ("allow", "jwt")
    decision = outcome.decision
    assert dict(decision.upstream_set) == {"x-user": "alice"}
    assert dict(decision.metadata) == {"user": "alice"}
    # the api-key step's identity header, sent by the client, does not reach the backend
    assert set(decision.upstream_remove) == {"authorization", "x-client-id"}


async def test_jwt_or_api_key_a_key_allows_with_the_key_identity(runtime: Runtime) -> None:
    outcome = await evaluate(runtime.policies["jwt-or-key"], **{"x-api-key": API_KEY, "x-user": "admin"})
    assert (outcome.label, outcome.step) == ("allow", "api-key")
    decision = outcome.decision
    assert dict(decision.upstream_set) == {"x-client-id": "batch-job"}
    assert dict(decision.metadata) == {"client_id": "batch-job"}
    assert set(decision.upstream_remove) == {"x-api-key", "x-user"}  # x-user: admin is dropped
    wire = to_check_response(decision)
    assert set(wire.ok_response.headers_to_remove) == {"x-api-key", "x-user"}
    assert "user" not in wire.dynamic_metadata.fields


async def test_jwt_or_api_key_a_bad_token_with_a_good_key_is_allowed_by_the_key(runtime: Runtime) -> None:
    outcome = await evaluate(
        runtime.policies["jwt-or-key"], **bearer(token(aud="billing")), **{"x-api-key": API_KEY}
    )
    assert (outcome.label, outcome.step) == ("allow", "api-key")
    assert ("x-user", "alice") not in outcome.decision.upstream_set


async def test_jwt_or_api_key_neither_is_the_jwt_401(runtime: Runtime) -> None:
    outcome = await evaluate(runtime.policies["jwt-or-key"], **{"x-api-key": "guess"})
    assert (outcome.label, outcome.step) == ("deny", "jwt")
    assert outcome.decision.status == 401
    assert dict(outcome.decision.headers) == {"www-authenticate": 'Bearer realm="extsvc"'}


# -- jwt AND client-cidr ---------------------------------------------------------------------------


async def test_jwt_and_client_cidr_both_hold(runtime: Runtime) -> None:
    outcome = await evaluate(runtime.policies["jwt-and-cidr"], **bearer(token()))
    assert outcome.label == "allow"
    assert dict(outcome.decision.upstream_set) == {"x-user": "alice"}
    assert dict(outcome.decision.metadata) == {"user": "alice"}


async def test_jwt_and_client_cidr_a_valid_token_from_outside_is_403(runtime: Runtime) -> None:
    outcome = await evaluate(runtime.policies["jwt-and-cidr"], "192.0.2.9:5000", **bearer(token()))
    assert (outcome.label, outcome.step, outcome.decision.status) == ("deny", "client-cidr", 403)


async def test_jwt_and_client_cidr_inside_without_a_token_is_401(runtime: Runtime) -> None:
    outcome = await evaluate(runtime.policies["jwt-and-cidr"], **{"x-user": "admin"})
    assert (outcome.label, outcome.step, outcome.decision.status) == ("deny", "jwt", 401)


async def test_an_allow_without_identity_scrubs_identity_headers(idp: IdpServer) -> None:
    """first-decisive: the jwt step abstains without a token, and a later step allows anonymously."""
    built = await runtime_of(f"""
policies:
  p:
    steps:
      - plugin: jwt
        config:
          providers:
            - {{name: idp, issuers: ["{ISSUER}"], audiences: [{AUDIENCE}], algorithms: [RS256],
                jwks_url: "{idp.jwks_url}"}}
          forward: {{headers: {{x-user: sub}}}}
          on_missing: abstain
      - plugin: allow
""")
    outcome = await evaluate(built.policies["p"], **{"x-user": "admin"})
    assert (outcome.label, outcome.step) == ("allow", "allow")
    assert outcome.decision.upstream_remove == ("x-user",)
    await built.close()


async def test_an_internal_error_answered_with_allow_scrubs_identity_headers(idp: IdpServer) -> None:
    """on_error: allow for a failure outside any step lets the request in, but with no identity."""
    built = await runtime_of(f"""
policies:
  p:
    on_error: allow
    steps:
      - plugin: jwt
        config:
          providers:
            - {{name: idp, issuers: ["{ISSUER}"], audiences: [{AUDIENCE}], algorithms: [RS256],
                jwks_url: "{idp.jwks_url}"}}
          forward: {{headers: {{x-user: sub}}}}
""")
    outcome = built.policies["p"].internal_error(check_context("/", headers={"x-user": "admin"}))
    assert (outcome.label, outcome.decision.allowed) == ("error", True)
    assert outcome.decision.upstream_remove == ("x-user",)
    await built.close()
