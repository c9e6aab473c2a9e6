"""The ``jwt`` plugin: providers, key sources, JWKS caching and refetching, claims, forwarding."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from extsvc import Decision
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.testing import check_context
from extsvc_plugins.jwt_auth import JwtAuthorizer, JwtConfig, KeysUnavailable

from .authkit import (
    AUDIENCE,
    ISSUER,
    FakeClock,
    IdpServer,
    bearer,
    context,
    counter_value,
    ec_key,
    ed_key,
    idp_server,
    jwks,
    public_jwk,
    public_pem,
    rsa_key,
    token,
)


@pytest.fixture
def idp() -> Iterator[IdpServer]:
    with idp_server() as server:
        server.state.jwks = jwks(public_jwk(rsa_key(), "k1"))
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def provider(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "idp", "issuers": [ISSUER], "audiences": [AUDIENCE], "algorithms": ["RS256"],
    }
    base.update(overrides)
    return base


def jwt_config(*providers: dict[str, Any], **overrides: Any) -> JwtConfig:
    return JwtConfig.model_validate({"providers": list(providers), **overrides})


class Steps:
    """Builds started steps and closes them at the end of the test."""

    def __init__(self, clock: FakeClock, metrics: Metrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self.built: list[JwtAuthorizer] = []

    async def __call__(
        self, *providers: dict[str, Any], start: bool = True, base_dir: Path = Path(), **overrides: Any
    ) -> JwtAuthorizer:
        ctx = context("jwt", self.clock, self.metrics, base_dir=base_dir)
        step = JwtAuthorizer(jwt_config(*providers, **overrides), ctx)
        self.built.append(step)
        if start:
            await step.start()
        return step


@pytest.fixture
async def steps(clock: FakeClock, metrics: Metrics) -> AsyncIterator[Steps]:
    maker = Steps(clock, metrics)
    yield maker
    for step in maker.built:
        await step.aclose()


async def check(step: JwtAuthorizer, path: str = "/orders", **request: Any) -> Decision:
    decision = await step.check(check_context(path, **request))
    assert decision is not None
    return decision


# -- registration and config ----------------------------------------------------------------------


def test_all_authentication_plugins_are_built_in() -> None:
    host = PluginHost.create(load_entry_points=False)
    kinds = {"jwt", "api-key", "basic-auth", "client-cidr", "oauth2-introspection"}
    assert kinds <= set(host.authorizers)
    assert {host.kind_owner(kind) for kind in kinds} == kinds  # registered under their kind names


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algorithms": ["none"]}, "algorithms.0"),
        ({"algorithms": ["RS256", "HS256"]}, "HS algorithms need hs_secret_file"),
        ({"algorithms": ["RS256"], "jwks_url": None, "hs_secret_file": "s"}, "allows only HS256"),
        ({"audiences": []}, "list audiences"),
        ({"keys": [public_pem(rsa_key())]}, "exactly one of jwks_url, jwks_file, keys"),
        ({"jwks_url": "file:///etc/passwd"}, r"jwks_url must be http\(s\)"),
        ({"leeway_s": 3600}, "leeway_s"),
        ({"jwks_max_bytes": 100}, "jwks_max_bytes"),
        ({"jwks_timeout_s": 0}, "jwks_timeout_s"),
        ({"discovery": True}, "exactly one of jwks_url, jwks_file, keys, hs_secret_file, discovery"),
        ({"jwks_url": None, "discovery": True, "issuers": ["http://idp.example"]},
         r"the issuer must be an https URL \(http only on a loopback address\)"),
        ({"jwks_url": None, "discovery": True, "discovery_url": "http://idp.example/meta"},
         "the discovery_url must be an https URL"),
        ({"jwks_url": None, "discovery": True, "issuers": [ISSUER, "https://b.test"]},
         "discovery needs exactly one issuer"),
        ({"discovery_url": "https://idp.test/meta"}, "discovery_url needs discovery: true"),
    ],
)
def test_unsafe_provider_configs_are_rejected(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        jwt_config(provider(**{"jwks_url": "http://127.0.0.1:1/jwks", **changes}))


@pytest.mark.parametrize(
    ("issuer", "discovery_url", "expected"),
    [
        ("https://idp.test", None, "https://idp.test/.well-known/openid-configuration"),
        ("https://idp.test/realms/a/", None, "https://idp.test/realms/a/.well-known/openid-configuration"),
        ("http://127.0.0.1:8080", None, "http://127.0.0.1:8080/.well-known/openid-configuration"),
        ("http://[::1]:8080", None, "http://[::1]:8080/.well-known/openid-configuration"),
        ("http://localhost", None, "http://localhost/.well-known/openid-configuration"),
        ("https://idp.test", "https://meta.test/x", "https://meta.test/x"),
    ],
)
def test_discovery_configs_that_are_accepted(issuer: str, discovery_url: str | None, expected: str) -> None:
    config = jwt_config(provider(issuers=[issuer], discovery=True, discovery_url=discovery_url))
    assert config.providers[0].discovery_document_url == expected


def test_an_issuer_owned_by_two_providers_is_rejected() -> None:
    with pytest.raises(ValidationError, match="listed by providers 'a' and 'b'"):
        jwt_config(provider(name="a", keys=[public_pem(rsa_key())]),
                   provider(name="b", keys=[public_pem(rsa_key())]))


def test_a_short_hs_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("too-short")
    config = jwt_config(provider(algorithms=["HS256"], hs_secret_file=str(tmp_path / "secret")))
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        JwtAuthorizer(config, context("jwt"))


# -- verification with each key source ------------------------------------------------------------


async def test_a_valid_token_from_a_jwks_url_is_allowed_and_its_claims_forwarded(
    steps: Steps, idp: IdpServer
) -> None:
    step = await steps(
        provider(jwks_url=idp.jwks_url),
        forward={"headers": {"x-user": "sub", "x-groups": "groups"}, "metadata": {"user": "sub"}},
    )
    decision = await check(step, headers=bearer(token(groups=["ops", "dev"])))
    assert decision.allowed
    assert dict(decision.upstream_set) == {"x-user": "alice", "x-groups": "ops,dev"}
    assert dict(decision.metadata) == {"user": "alice"}
    assert decision.reason == "jwt: idp sub=alice"
    assert step.identity_headers == frozenset({"x-user", "x-groups"})


@pytest.mark.parametrize(
    ("alg", "key", "entry"),
    [
        ("ES256", ec_key(), lambda: public_jwk(ec_key(), "k1")),
        ("EdDSA", ed_key(), lambda: public_jwk(ed_key(), "k1")),
        ("PS256", rsa_key(), lambda: public_jwk(rsa_key(), "k1", "PS256")),
    ],
    ids=["ES256", "EdDSA", "PS256"],
)
async def test_inline_jwks_of_each_family(steps: Steps, alg: str, key: Any, entry: Any) -> None:
    step = await steps(provider(algorithms=[alg], keys=[entry()]))
    assert (await check(step, headers=bearer(token(key, alg=alg)))).allowed


async def test_an_inline_pem_key_verifies_tokens_without_kid(steps: Steps) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())]))
    assert (await check(step, headers=bearer(token(kid=None)))).allowed


async def test_a_jwks_file(steps: Steps, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(public_jwk(rsa_key(), "k1"))))
    step = await steps(provider(jwks_file="jwks.json"), base_dir=tmp_path)  # relative to the config
    assert (await check(step, headers=bearer(token()))).allowed


async def test_a_jwks_file_that_cannot_be_read_rejects_the_config_when_built(
    steps: Steps, tmp_path: Path
) -> None:
    # at build, not start: `extsvc validate` builds every step without starting it
    with pytest.raises(ValueError, match=r"cannot load jwks_file .*missing\.json: No such file"):
        await steps(provider(jwks_file=str(tmp_path / "missing.json")), start=False)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        await steps(provider(jwks_file=str(tmp_path / "list.json")), start=False)


async def test_hs256_with_an_explicit_secret(steps: Steps, tmp_path: Path) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    (tmp_path / "secret").write_bytes(secret + b"\n")  # a trailing newline in the Secret is fine
    step = await steps(provider(algorithms=["HS256"], hs_secret_file=str(tmp_path / "secret")))
    assert (await check(step, headers=bearer(token(secret, alg="HS256")))).allowed
    other = b"x" * 32
    assert not (await check(step, headers=bearer(token(other, alg="HS256")))).allowed


async def test_several_providers_are_told_apart_by_issuer(steps: Steps) -> None:
    step = await steps(
        provider(name="corp", keys=[public_jwk(rsa_key("corp"), "c1")]),
        provider(name="partner", issuers=["https://partner.test"], algorithms=["ES256"],
                 keys=[public_jwk(ec_key("partner"), "p1")]),
    )
    corp = await check(step, headers=bearer(token(rsa_key("corp"), kid="c1")))
    partner = await check(step, headers=bearer(
        token(ec_key("partner"), kid="p1", alg="ES256", iss="https://partner.test")))
    assert (corp.allowed, corp.reason) == (True, "jwt: corp sub=alice")
    assert (partner.allowed, partner.reason) == (True, "jwt: partner sub=alice")
    # a partner-signed token claiming to come from corp is no corp token
    forged = await check(step, headers=bearer(token(ec_key("partner"), kid="p1", alg="ES256")))
    assert not forged.allowed


# -- where the token is, and removing it ----------------------------------------------------------


async def test_the_token_from_a_header_a_cookie_or_a_query_parameter(steps: Steps) -> None:
    step = await steps(
        provider(keys=[public_jwk(rsa_key(), "k1")]),
        sources=[{"header": "x-token"}, {"cookie": "session"}, {"query": "access_token"}],
        remove_credential=True,
    )
    by_header = await check(step, headers={"x-token": token()})
    assert by_header.allowed and by_header.upstream_remove == ("x-token",)

    by_cookie = await check(step, headers={"cookie": f"theme=dark; session={token()}; lang=en"})
    assert by_cookie.allowed
    assert dict(by_cookie.upstream_set)["cookie"] == "theme=dark; lang=en"

    query_token = token()
    by_query = await check(step, path=f"/orders?access_token={query_token}&page=2")
    assert by_query.allowed and by_query.query_remove == ("access_token",)


async def test_a_cached_token_still_has_its_credential_removed(steps: Steps) -> None:
    step = await steps(provider(keys=[public_jwk(rsa_key(), "k1")]), remove_credential=True)
    presented = token()
    first = await check(step, headers=bearer(presented))
    second = await check(step, headers=bearer(presented))
    assert first.upstream_remove == second.upstream_remove == ("authorization",)
    assert second is first  # a header credential's removal is built once per cached token
    other = await check(step, headers=bearer(token(sub="bob")))
    assert other is not first and other.upstream_remove == ("authorization",)


async def test_missing_token_is_401_with_a_challenge_or_an_abstention(steps: Steps) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())]), realm='api"x')
    decision = await check(step)
    assert (decision.allowed, decision.status) == (False, 401)
    assert dict(decision.headers) == {"www-authenticate": 'Bearer realm="apix"'}

    abstaining = await steps(provider(keys=[public_pem(rsa_key())]), on_missing="abstain")
    assert await abstaining.check(check_context("/")) is None


async def test_a_bad_token_gets_invalid_token_in_the_challenge(steps: Steps) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())]))
    decision = await check(step, headers=bearer(token(exp=int(time.time()) - 3600)))
    assert decision.status == 401
    assert dict(decision.headers)["www-authenticate"] == 'Bearer realm="extsvc", error="invalid_token"'


# -- time claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "offset", "leeway", "allowed"),
    [
        ("exp", -10, 30, True),
        ("exp", -10, 0, False),
        ("nbf", 10, 30, True),
        ("nbf", 10, 0, False),
        ("iat", 120, 30, False),  # issued in the future
    ],
)
async def test_leeway_applies_to_exp_nbf_and_iat(
    steps: Steps, claim: str, offset: int, leeway: int, allowed: bool
) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())], leeway_s=leeway))
    decision = await check(step, headers=bearer(token(kid=None, **{claim: int(time.time()) + offset})))
    assert decision.allowed is allowed


async def test_required_claims(steps: Steps) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())], required_claims=["exp", "sub"]))
    assert not (await check(step, headers=bearer(token(kid=None, sub=None)))).allowed
    assert not (await check(step, headers=bearer(token(kid=None, exp=None)))).allowed
    assert (await check(step, headers=bearer(token(kid=None)))).allowed


# -- claim rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "value", "allowed"),
    [
        ({"contains": ["orders.read"]}, "profile orders.read", True),
        ({"contains": ["orders.read", "orders.write"]}, "orders.read", False),
        ({"contains": ["orders.read"]}, ["orders.read"], True),
        ({"contains": ["orders.read"]}, 42, False),  # a number is no scope list: deny, not crash
        ({"any_of": ["ops", "admin"]}, ["dev", "ops"], True),
        ({"any_of": ["ops", "admin"]}, ["dev"], False),
        ({"any_of": ["ops"]}, {"ops": True}, False),
        ({"equals": "gold"}, "gold", True),
        ({"equals": "gold"}, "silver", False),
        ({"equals": "gold"}, None, False),
    ],
)
async def test_claim_rules(steps: Steps, rule: dict[str, Any], value: Any, allowed: bool) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())], claims={"c": rule}))
    decision = await check(step, headers=bearer(token(kid=None, c=value)))
    assert decision.allowed is allowed
    if not allowed:
        assert decision.status == 403
        assert 'error="insufficient_scope"' in dict(decision.headers)["www-authenticate"]


# -- the cache of verified tokens ----------------------------------------------------------------


async def test_verified_tokens_are_cached_but_never_past_exp(
    steps: Steps, clock: FakeClock, metrics: Metrics
) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())], leeway_s=0))
    presented = token(kid=None, exp=int(time.time()) + 20)
    for _ in range(3):
        assert (await check(step, headers=bearer(presented))).allowed
    assert counter_value(metrics, "jwt", "jwt_cache_hits") == 2
    clock.advance(25)  # past exp on the step's clock: the entry is gone
    await check(step, headers=bearer(presented))
    assert counter_value(metrics, "jwt", "jwt_cache_hits") == 2  # verified again, not served


async def test_cache_ttl_is_capped_by_max_ttl(steps: Steps, clock: FakeClock, metrics: Metrics) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())]), cache={"max_ttl_s": 5})
    presented = token(kid=None)
    await check(step, headers=bearer(presented))
    clock.advance(4)
    await check(step, headers=bearer(presented))
    clock.advance(2)
    await check(step, headers=bearer(presented))
    assert counter_value(metrics, "jwt", "jwt_cache_hits") == 1


async def test_the_cache_can_be_turned_off(steps: Steps, metrics: Metrics) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())]), cache={"enabled": False})
    presented = token(kid=None)
    for _ in range(3):
        assert (await check(step, headers=bearer(presented))).allowed
    assert counter_value(metrics, "jwt", "jwt_cache_hits") == 0


async def test_denials_are_not_cached(steps: Steps, metrics: Metrics) -> None:
    step = await steps(provider(keys=[public_pem(rsa_key())]))
    expired = token(kid=None, exp=int(time.time()) - 3600)
    for _ in range(2):
        assert not (await check(step, headers=bearer(expired))).allowed
    assert counter_value(metrics, "jwt", "jwt_rejected") == 2  # both verified (and refused)


# -- JWKS: TTL, unknown kid, outages ---------------------------------------------------------------


async def test_jwks_is_fetched_at_start_and_refreshed_after_its_ttl(
    steps: Steps, idp: IdpServer, clock: FakeClock
) -> None:
    step = await steps(provider(jwks_url=idp.jwks_url, jwks_ttl_s=60, jwks_min_refetch_interval_s=10))
    assert idp.state.jwks_requests == 1
    await check(step, headers=bearer(token()))
    clock.advance(30)
    await check(step, headers=bearer(token()))
    assert idp.state.jwks_requests == 1  # fresh: no fetch
    clock.advance(31)
    assert (await check(step, headers=bearer(token()))).allowed  # stale keys serve meanwhile
    await step.key_set("idp").refresh()  # joins the background refresh
    assert idp.state.jwks_requests == 2


async def test_an_unknown_kid_refetches_at_most_once_per_interval(
    steps: Steps, idp: IdpServer, clock: FakeClock
) -> None:
    step = await steps(provider(jwks_url=idp.jwks_url, jwks_min_refetch_interval_s=30))
    clock.advance(30)
    # the IdP rotates: k2 is new
    idp.state.jwks = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    assert (await check(step, headers=bearer(token(rsa_key("b"), kid="k2")))).allowed
    assert idp.state.jwks_requests == 2
    # random kids within the interval cost no fetch
    for kid in ("x1", "x2", "x3"):
        assert not (await check(step, headers=bearer(token(kid=kid)))).allowed
    assert idp.state.jwks_requests == 2
    clock.advance(30)
    assert not (await check(step, headers=bearer(token(kid="x4")))).allowed
    assert idp.state.jwks_requests == 3


async def test_concurrent_unknown_kids_share_one_fetch(
    steps: Steps, idp: IdpServer, clock: FakeClock
) -> None:
    step = await steps(provider(jwks_url=idp.jwks_url, jwks_min_refetch_interval_s=1))
    clock.advance(2)
    idp.state.delay_s = 0.1
    idp.state.jwks = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    decisions = await asyncio.gather(
        *(check(step, headers=bearer(token(rsa_key("b"), kid="k2"))) for _ in range(10))
    )
    assert all(d.allowed for d in decisions)
    assert idp.state.jwks_requests == 2


async def test_keys_survive_an_outage_and_a_reload_during_it(
    steps: Steps, idp: IdpServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    step = await steps(provider(jwks_url=idp.jwks_url, jwks_ttl_s=60, jwks_min_refetch_interval_s=10))
    idp.stop()
    clock.advance(120)  # stale, and the endpoint refuses connections
    assert (await check(step, headers=bearer(token()))).allowed
    await step.key_set("idp").refresh()
    assert "JWKS refresh failed" in caplog.text and "keeping 1 cached key(s)" in caplog.text
    assert (await check(step, headers=bearer(token()))).allowed
    # a config reload builds a new step while the IdP is still down: it starts with the last good set
    reloaded = await steps(provider(jwks_url=idp.jwks_url))
    assert (await check(reloaded, headers=bearer(token()))).allowed
    assert not await reloaded.key_set("idp").refresh()
    assert "serving the 1 key(s) it last returned before the reload" in caplog.text


async def test_a_jwks_with_no_usable_key_keeps_the_last_good_set(
    steps: Steps, idp: IdpServer, clock: FakeClock
) -> None:
    step = await steps(provider(jwks_url=idp.jwks_url, jwks_min_refetch_interval_s=0))
    idp.state.jwks = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}, {"kty": "RSA", "kid": "bad"}]}
    assert not await step.key_set("idp").refresh()
    assert (await check(step, headers=bearer(token()))).allowed


async def test_a_symmetric_key_in_a_jwks_is_never_used(steps: Steps, idp: IdpServer) -> None:
    idp.state.jwks = jwks(public_jwk(rsa_key(), "k1"), {"kty": "oct", "k": "c2VjcmV0", "kid": "h"})
    step = await steps(provider(jwks_url=idp.jwks_url))
    assert len(step.key_set("idp")) == 1


async def test_a_jwk_pinned_to_another_algorithm_is_not_used(steps: Steps) -> None:
    step = await steps(provider(algorithms=["RS256", "PS256"], keys=[public_jwk(rsa_key(), "k1", "PS256")]))
    assert (await check(step, headers=bearer(token(alg="PS256")))).allowed
    assert not (await check(step, headers=bearer(token(alg="RS256")))).allowed


# -- keys not loaded yet: start-up never waits long, tokens are step errors ----------------------


async def test_start_waits_at_most_startup_wait_s_and_tokens_are_errors_until_keys_arrive(
    steps: Steps, idp: IdpServer, clock: FakeClock
) -> None:
    idp.state.delay_s = 1.0
    began = time.monotonic()
    step = await steps(
        provider(jwks_url=idp.jwks_url),
        provider(name="inline", issuers=["https://other.test"], keys=[public_jwk(rsa_key("o"), "o1")]),
        startup_wait_s=0.2,
    )
    assert time.monotonic() - began < 0.8
    not_yet = r"provider idp: no keys loaded yet \(the first fetch has not finished\)"
    with pytest.raises(KeysUnavailable, match=not_yet):
        await check(step, headers=bearer(token()))
    # the other provider is not held up
    other = token(rsa_key("o"), kid="o1", iss="https://other.test")
    assert (await check(step, headers=bearer(other))).allowed
    assert await step.key_set("idp").refresh()  # joins the fetch start() began
    assert (await check(step, headers=bearer(token()))).allowed
    assert idp.state.jwks_requests == 1


async def test_a_provider_whose_idp_is_down_answers_errors_and_retries_in_the_background(
    steps: Steps, idp: IdpServer, metrics: Metrics
) -> None:
    url = idp.jwks_url
    idp.stop()
    began = time.monotonic()
    step = await steps(provider(jwks_url=url, jwks_min_refetch_interval_s=60))
    assert time.monotonic() - began < 1.5
    with pytest.raises(KeysUnavailable, match="connect error"):
        await check(step, headers=bearer(token()))
    keys = step.key_set("idp")
    assert keys.fetches == 1  # within the refetch interval a request does not fetch
    # the background loader retries (after about a second) without any request
    deadline = time.monotonic() + 3
    # a fetch is counted as a failure when it ends, a little after it started
    while keys.fetches < 2 or counter_value(metrics, "jwt", "remote_fetch_failures") < 2:
        assert time.monotonic() < deadline, "no retry"
        await asyncio.sleep(0.05)


async def test_aclose_cancels_the_background_fetches(steps: Steps, idp: IdpServer) -> None:
    idp.state.delay_s = 3.0
    step = await steps(provider(jwks_url=idp.jwks_url), startup_wait_s=0)
    began = time.monotonic()
    await step.aclose()
    assert time.monotonic() - began < 0.5


async def test_a_jwks_larger_than_jwks_max_bytes_is_refused(
    steps: Steps, idp: IdpServer, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    idp.state.jwks = jwks(*(public_jwk(rsa_key(), f"k{i}") for i in range(1, 40)))  # ~17 KiB
    step = await steps(provider(jwks_url=idp.jwks_url, jwks_max_bytes=4096))
    with pytest.raises(KeysUnavailable, match="larger than the 4096-byte cap"):
        await check(step, headers=bearer(token()))
    assert "raise jwks_max_bytes" in caplog.text
    assert counter_value(metrics, "jwt", "remote_too_large") == 1
    roomy = await steps(provider(jwks_url=idp.jwks_url, jwks_max_bytes=64 * 1024))
    assert (await check(roomy, headers=bearer(token()))).allowed


# -- OpenID Connect discovery --------------------------------------------------------------------


async def test_discovery_is_redone_when_the_jwks_fetch_fails(
    steps: Steps, idp: IdpServer, clock: FakeClock
) -> None:
    idp.serve_discovery()
    step = await steps(provider(issuers=[idp.issuer], discovery=True, jwks_min_refetch_interval_s=0))
    assert (await check(step, headers=bearer(token(iss=idp.issuer)))).allowed
    assert (idp.state.discovery_requests, idp.state.jwks_requests) == (1, 1)
    keys = step.key_set("idp")
    assert await keys.refresh()  # the JWKS again, from the jwks_uri already discovered
    assert (idp.state.discovery_requests, idp.state.jwks_requests) == (1, 2)
    idp.state.jwks_status = 500
    assert not await keys.refresh()  # failed: jwks_uri may have moved
    idp.state.jwks_status = 200
    assert await keys.refresh()
    assert (idp.state.discovery_requests, idp.state.jwks_requests) == (2, 4)
    assert (await check(step, headers=bearer(token(iss=idp.issuer)))).allowed  # keys kept throughout


async def test_a_discovery_document_for_another_issuer_loads_no_keys(
    steps: Steps, idp: IdpServer, caplog: pytest.LogCaptureFixture
) -> None:
    idp.state.discovery = {"issuer": "https://evil.test", "jwks_uri": idp.jwks_url}
    step = await steps(provider(issuers=[idp.issuer], discovery=True))
    with pytest.raises(KeysUnavailable, match=r"names issuer 'https://evil\.test'"):
        await check(step, headers=bearer(token(iss=idp.issuer)))
    assert idp.state.jwks_requests == 0
    assert any(r.levelname == "ERROR" and "names issuer" in r.getMessage() for r in caplog.records)
