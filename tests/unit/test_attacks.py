"""The attack suite: every forged, stale, mangled or guessed credential is denied, with its reason
in the log.

Each attack goes through a compiled policy (the path a Check takes) and must end as a clean
``deny`` -- not an ``error`` (a plugin that raised) and never an ``allow``. The identity provider
is a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extsvc.authz.pipeline import CompiledPolicy, Outcome
from extsvc.reload.runtime import Runtime
from extsvc.testing import check_context
from extsvc_plugins import jwt_keys
from extsvc_plugins.jwt_auth import JwtAuthorizer, JwtConfig

from .authkit import (
    AUDIENCE,
    ISSUER,
    IdpServer,
    b64url,
    bearer,
    claims,
    context,
    ec_key,
    forge,
    idp_server,
    jwks,
    public_jwk,
    public_pem,
    rsa_key,
    runtime_of,
    token,
)

REQUEST_ID = "attack-7"


@pytest.fixture(autouse=True)
def _isolated(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Plugin logs captured from DEBUG up; no JWKS remembered from another test."""
    caplog.set_level(logging.DEBUG, logger="extsvc.plugin")
    jwt_keys._LAST_GOOD_JWKS.clear()
    yield
    jwt_keys._LAST_GOOD_JWKS.clear()


@pytest.fixture
def idp() -> Iterator[IdpServer]:
    with idp_server() as server:
        server.state.jwks = jwks(public_jwk(rsa_key(), "k1"))
        yield server


def jwt_policy_yaml(jwks_url: str, algorithms: str = "[RS256]", refetch_interval_s: float = 30) -> str:
    return f"""
policies:
  p:
    steps:
      - plugin: jwt
        config:
          providers:
            - name: idp
              issuers: ["{ISSUER}"]
              audiences: [{AUDIENCE}]
              algorithms: {algorithms}
              jwks_url: "{jwks_url}"
              leeway_s: 0
              jwks_min_refetch_interval_s: {refetch_interval_s}
          forward: {{headers: {{x-user: sub}}}}
"""


@pytest.fixture
async def runtimes() -> AsyncIterator[list[Runtime]]:
    built: list[Runtime] = []
    yield built
    for runtime in built:
        await runtime.close()


@pytest.fixture
async def jwt_policy(idp: IdpServer, runtimes: list[Runtime]) -> CompiledPolicy:
    runtime = await runtime_of(jwt_policy_yaml(idp.jwks_url))
    runtimes.append(runtime)
    return runtime.policies["p"]


async def evaluate(policy: CompiledPolicy, headers: dict[str, str]) -> Outcome:
    deadline = asyncio.get_running_loop().time() + 5
    return await policy.evaluate(check_context("/orders", headers=headers, request_id=REQUEST_ID), deadline)


def assert_denied(outcome: Outcome, caplog: pytest.LogCaptureFixture, reason: str, status: int = 401) -> None:
    assert outcome.label == "deny", f"expected a clean deny, got {outcome.label}: {outcome.decision.reason}"
    assert (outcome.decision.allowed, outcome.decision.status) == (False, status)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("extsvc.plugin.")]
    assert any(reason in line and f"[request_id={REQUEST_ID}]" in line for line in lines), (
        f"no log line with {reason!r}: {lines}"
    )


# -- forged and stale JWTs -----------------------------------------------------------------------


def alg_none() -> str:
    return forge({"alg": "none", "typ": "JWT", "kid": "k1"}, claims())


def alg_none_capitalised() -> str:
    return forge({"alg": "None", "typ": "JWT", "kid": "k1"}, claims())


def hs256_signed_with_the_rsa_public_key() -> str:
    """The key-confusion attack: the public key (which anyone can fetch) as an HMAC secret."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64url(json.dumps(claims(sub="admin")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(public_pem(rsa_key()).encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def tampered_payload() -> str:
    header, _, signature = token().split(".")
    return f"{header}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"


def signed_by_another_key_under_a_known_kid() -> str:
    return token(rsa_key("attacker"), kid="k1")


def jku_pointing_elsewhere() -> str:
    return token(rsa_key("attacker"), kid="attacker", headers={"jku": "https://evil.test/jwks"})


def huge() -> str:
    return token(padding="x" * 100_000)


JWT_ATTACKS: dict[str, tuple[Callable[[], str], str]] = {
    "alg-none": (alg_none, "algorithm 'none' not allowed"),
    "alg-None": (alg_none_capitalised, "algorithm 'None' not allowed"),
    "hs256-with-rsa-public-key": (hs256_signed_with_the_rsa_public_key, "algorithm 'HS256' not allowed"),
    "expired": (lambda: token(exp=int(time.time()) - 60), "token expired"),
    "nbf-in-the-future": (lambda: token(nbf=int(time.time()) + 3600), "token not yet valid"),
    "iat-in-the-future": (lambda: token(iat=int(time.time()) + 3600), "token not yet valid"),
    "wrong-issuer": (lambda: token(iss="https://evil.test"), "unknown issuer 'https://evil.test'"),
    "no-issuer": (lambda: token(iss=None), "unknown issuer 'None'"),
    "wrong-audience": (lambda: token(aud="billing"), "wrong audience"),
    "no-audience": (lambda: token(aud=None), "missing claim 'aud'"),
    "no-exp": (lambda: token(exp=None), "missing claim 'exp'"),
    "unknown-kid": (lambda: token(rsa_key("attacker"), kid="attacker"), "no RS256 key for kid 'attacker'"),
    "kid-path-traversal": (lambda: token(kid="../../../../dev/null"), "no RS256 key for kid"),
    "jku-header": (jku_pointing_elsewhere, "no RS256 key for kid 'attacker'"),
    "other-key-known-kid": (signed_by_another_key_under_a_known_kid, "bad signature"),
    "tampered-payload": (tampered_payload, "bad signature"),
    "truncated-signature": (lambda: token()[:-12], "jwt denied: "),
    "truncated-to-two-parts": (lambda: token().rsplit(".", 1)[0], "malformed token: Not enough segments"),
    "cut-in-the-payload": (lambda: token()[:80], "malformed token"),
    "100-kb-token": (huge, "token longer than 8192 bytes"),
}


@pytest.mark.parametrize(("build", "reason"), JWT_ATTACKS.values(), ids=JWT_ATTACKS.keys())
async def test_jwt_attacks_are_denied(
    jwt_policy: CompiledPolicy, caplog: pytest.LogCaptureFixture, build: Callable[[], str], reason: str
) -> None:
    outcome = await evaluate(jwt_policy, bearer(build()))
    assert_denied(outcome, caplog, reason)
    assert 'error="invalid_token"' in dict(outcome.decision.headers)["www-authenticate"]


async def test_the_control_case_a_valid_token_is_allowed(jwt_policy: CompiledPolicy) -> None:
    outcome = await evaluate(jwt_policy, bearer(token()))
    assert outcome.label == "allow"
    assert ("x-user", "alice") in outcome.decision.upstream_set


async def test_a_token_of_another_key_family_under_a_known_kid(
    idp: IdpServer, runtimes: list[Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    """ES256 allowed, but kid k1 is an RSA key: refused, not a TypeError inside pyjwt."""
    runtime = await runtime_of(jwt_policy_yaml(idp.jwks_url, "[RS256, ES256]"))
    runtimes.append(runtime)
    outcome = await evaluate(runtime.policies["p"], bearer(token(ec_key(), alg="ES256", kid="k1")))
    assert_denied(outcome, caplog, "no ES256 key for kid 'k1'")


GARBAGE_AUTHORIZATION: dict[str, tuple[str, str]] = {
    "empty": ("", "jwt denied: no token"),
    "bearer-only": ("Bearer", "jwt denied: no token"),
    "bearer-blank": ("Bearer    ", "jwt denied: no token"),
    "basic-scheme": ("Basic dXNlcjpwYXNz", "jwt denied: no token"),
    "other-scheme": ("Token abc.def.ghi", "jwt denied: no token"),
    "null": ("Bearer null", "malformed token: Not enough segments"),
    "dots": ("Bearer ...", "malformed token"),
    "four-parts": ("Bearer a.b.c.d", "malformed token"),
    "not-base64": ("Bearer ###.$$$.%%%", "malformed token"),
    "json-not-object": (f"Bearer {b64url(b'[1]')}.{b64url(b'[2]')}.x", "malformed token"),
    "header-only": ("Bearer eyJhbGciOiJub25lIn0", "malformed token: Not enough segments"),
    "non-ascii": ("Bearer \u00ff\u00fe.\u2603.\u0000", "malformed token"),
    "no-claims-at-all": ("Bearer eyJhbGciOiJub25lIn0.e30.", "unknown issuer 'None'"),
    "issuer-not-a-string": ("Bearer " + forge({"alg": "RS256"}, {"iss": 1}, b"sig"), "unknown issuer '1'"),
}


@pytest.mark.parametrize(
    ("value", "reason"), GARBAGE_AUTHORIZATION.values(), ids=GARBAGE_AUTHORIZATION.keys()
)
async def test_garbage_authorization_headers_are_denied(
    jwt_policy: CompiledPolicy, caplog: pytest.LogCaptureFixture, value: str, reason: str
) -> None:
    assert_denied(await evaluate(jwt_policy, {"authorization": value}), caplog, reason)


@functools.cache
def _inline_step() -> JwtAuthorizer:
    """One step with an inline key, shared by the examples (no network, nothing to close)."""
    config = JwtConfig.model_validate({"providers": [{
        "name": "idp", "issuers": [ISSUER], "audiences": [AUDIENCE], "algorithms": ["RS256"],
        "keys": [public_jwk(rsa_key(), "k1")],
    }]})
    return JwtAuthorizer(config, context("jwt"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b64url(b) + "." + b64url(b)))
async def test_any_string_as_a_token_is_denied_without_raising(value: str) -> None:
    decision = await _inline_step().check(check_context("/", headers=bearer(value)))
    assert decision is not None and not decision.allowed


_VALID = token(kid="k1", exp=int(time.time()) + 86_400)
_SEGMENTS = [i for i, c in enumerate(_VALID) if c != "."]
# the last character of a base64url segment carries padding bits a decoder may ignore: changing
# only those bits can leave the bytes (and so the token) valid, which is no forgery
_MUTABLE = [i for i in _SEGMENTS if i + 1 < len(_VALID) and _VALID[i + 1] != "."]


@settings(max_examples=150, deadline=None)
@given(position=st.sampled_from(_MUTABLE), replacement=st.sampled_from("ABCDEFabcdef0123456789-_"))
async def test_changing_any_character_of_a_valid_token_denies_it(position: int, replacement: str) -> None:
    if _VALID[position] == replacement:
        replacement = "Q" if replacement != "Q" else "R"
    mutated = _VALID[:position] + replacement + _VALID[position + 1:]
    step = _inline_step()
    assert (await step.check(check_context("/", headers=bearer(_VALID)))).allowed  # type: ignore[union-attr]
    decision = await step.check(check_context("/", headers=bearer(mutated)))
    assert decision is not None and not decision.allowed


# -- JWKS endpoint down ---------------------------------------------------------------------------


async def test_jwks_down_cached_keys_keep_working(
    idp: IdpServer, runtimes: list[Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    runtime = await runtime_of(jwt_policy_yaml(idp.jwks_url, refetch_interval_s=0))
    runtimes.append(runtime)
    jwt_policy = runtime.policies["p"]
    idp.stop()
    assert (await evaluate(jwt_policy, bearer(token()))).label == "allow"
    # an unknown kid now triggers a refetch that fails: denied, with the cached key still there
    outcome = await evaluate(jwt_policy, bearer(token(rsa_key("b"), kid="rotated")))
    assert_denied(outcome, caplog, "no RS256 key for kid 'rotated' (provider idp, 1 key(s) loaded)")
    assert "JWKS refresh failed" in caplog.text
    assert (await evaluate(jwt_policy, bearer(token()))).label == "allow"


async def test_jwks_down_with_no_keys_at_all_is_a_step_error_never_an_allow(
    runtimes: list[Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    with idp_server() as idp:
        url = f"{idp.jwks_url}-{uuid.uuid4().hex}"
    # the server is gone before the policy ever fetched a key: not the token's fault, so the
    # step fails and the policy answers per its on_error (deny here), never an allow
    runtime = await runtime_of(jwt_policy_yaml(url))
    runtimes.append(runtime)
    outcome = await evaluate(runtime.policies["p"], bearer(token()))
    assert outcome.label == "error" and not outcome.decision.allowed
    assert any("no keys loaded yet" in r.getMessage() for r in caplog.records)


# -- API keys --------------------------------------------------------------------------------------

API_KEY = "Kx7-Secret-Abc123"


@pytest.fixture
async def api_key_policy(tmp_path: Path, runtimes: list[Runtime]) -> CompiledPolicy:
    (tmp_path / "keys.txt").write_text(f"{API_KEY} client-1\n")
    runtime = await runtime_of(f"""
policies:
  p:
    steps:
      - plugin: api-key
        config: {{keys_file: "{tmp_path / 'keys.txt'}"}}
""")
    runtimes.append(runtime)
    return runtime.policies["p"]


@pytest.mark.parametrize(
    "presented",
    [API_KEY + "\n", API_KEY.lower(), API_KEY.upper(), " " + API_KEY, API_KEY + " ", API_KEY[:-1],
     API_KEY + "4"],
    ids=["trailing-newline", "lower-case", "upper-case", "leading-space", "trailing-space", "prefix",
         "extended"],
)
async def test_api_key_variants_are_denied(
    api_key_policy: CompiledPolicy, caplog: pytest.LogCaptureFixture, presented: str
) -> None:
    assert (await evaluate(api_key_policy, {"x-api-key": API_KEY})).label == "allow"  # the control
    outcome = await evaluate(api_key_policy, {"x-api-key": presented})
    assert_denied(outcome, caplog, "api-key denied: unknown key")


# -- basic auth ------------------------------------------------------------------------------------


@pytest.fixture
async def basic_policy(tmp_path: Path, runtimes: list[Runtime]) -> CompiledPolicy:
    hashed = bcrypt.hashpw(b"correct horse", bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{hashed}\n")
    runtime = await runtime_of(f"""
policies:
  p:
    steps:
      - plugin: basic-auth
        config: {{htpasswd_file: "{tmp_path / 'htpasswd'}"}}
""")
    runtimes.append(runtime)
    return runtime.policies["p"]


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [
        ("alice", "wrong horse", "wrong password for 'alice'"),
        ("alice", "", "wrong password for 'alice'"),
        ("alice", "correct horse\n", "wrong password for 'alice'"),
        ("mallory", "correct horse", "unknown user 'mallory'"),
        ("Alice", "correct horse", "unknown user 'Alice'"),
    ],
)
async def test_basic_auth_wrong_password_and_unknown_user_are_denied(
    basic_policy: CompiledPolicy, caplog: pytest.LogCaptureFixture, user: str, password: str, reason: str
) -> None:
    assert (await evaluate(basic_policy, basic("alice", "correct horse"))).label == "allow"  # the control
    assert_denied(await evaluate(basic_policy, basic(user, password)), caplog, reason)
