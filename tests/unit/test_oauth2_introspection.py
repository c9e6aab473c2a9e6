"""The ``oauth2-introspection`` plugin against a real RFC 7662 endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from extsvc import Decision, RemoteTimeout, RemoteTooLarge
from extsvc.observability.metrics import Metrics
from extsvc.testing import check_context
from extsvc_plugins.oauth2_introspection import Introspection, IntrospectionConfig

from .authkit import FakeClock, IdpServer, bearer, context, counter_value, idp_server, runtime_of


@pytest.fixture
def idp() -> Iterator[IdpServer]:
    with idp_server() as server:
        server.state.tokens["good"] = {
            "active": True, "sub": "alice", "scope": "orders.read profile", "aud": "orders",
            "exp": int(time.time()) + 3600,
        }
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    (tmp_path / "client-secret").write_text("s3cr:t/+\n")
    return tmp_path


class Steps:
    def __init__(self, idp: IdpServer, folder: Path, clock: FakeClock, metrics: Metrics) -> None:
        self.idp = idp
        self.folder = folder
        self.clock = clock
        self.metrics = metrics
        self.built: list[Introspection] = []

    def __call__(self, **config: Any) -> Introspection:
        settings = {"endpoint": self.idp.introspection_url, "client_id": "gate way",
                    "client_secret_file": "client-secret", **config}
        step = Introspection(
            IntrospectionConfig.model_validate(settings),
            context("oauth2-introspection", self.clock, self.metrics, base_dir=self.folder),
        )
        self.built.append(step)
        return step


@pytest.fixture
async def steps(idp: IdpServer, secret_dir: Path, clock: FakeClock, metrics: Metrics) -> AsyncIterator[Steps]:
    maker = Steps(idp, secret_dir, clock, metrics)
    yield maker
    for step in maker.built:
        await step.aclose()


async def check(step: Introspection, **request: Any) -> Decision:
    decision = await step.check(check_context("/", **request))
    assert decision is not None
    return decision


async def test_an_active_token_is_allowed_and_the_call_is_rfc_7662(steps: Steps, idp: IdpServer) -> None:
    step = steps(forward={"headers": {"x-user": "sub"}, "metadata": {"user": "sub"}})
    decision = await check(step, headers=bearer("good"))
    assert decision.allowed
    assert dict(decision.upstream_set) == {"x-user": "alice"}
    assert dict(decision.metadata) == {"user": "alice"}
    [call] = idp.state.introspections
    assert call["form"] == {"token": "good", "token_type_hint": "access_token"}
    # RFC 6749 §2.3.1: client id and secret are form-encoded, then joined for Basic
    expected = base64.b64encode(b"gate+way:s3cr%3At%2F%2B").decode()
    assert call["authorization"] == f"Basic {expected}"


@pytest.mark.parametrize(
    ("answer", "config", "status", "reason"),
    [
        ({"active": False}, {}, 401, "token not active"),
        ({"active": "true"}, {}, 401, "token not active"),  # only the JSON literal true counts
        ({"active": True, "exp": 1}, {}, 401, "token expired"),
        ({"active": True, "scope": "profile"}, {"required_scopes": ["orders.read"]}, 403,
         "missing scope 'orders.read'"),
        ({"active": True, "aud": ["billing"]}, {"audiences": ["orders"]}, 401, "wrong audience"),
    ],
)
async def test_refusals(
    steps: Steps, idp: IdpServer, answer: dict[str, Any], config: dict[str, Any], status: int, reason: str
) -> None:
    idp.state.tokens["t"] = answer
    decision = await check(steps(**config), headers=bearer("t"))
    assert (decision.allowed, decision.status) == (False, status)
    assert decision.reason == f"oauth2-introspection: {reason}"
    error = "insufficient_scope" if status == 403 else "invalid_token"
    assert dict(decision.headers)["www-authenticate"] == f'Bearer realm="extsvc", error="{error}"'


async def test_audience_and_scopes_that_match(steps: Steps) -> None:
    step = steps(required_scopes=["orders.read"], audiences=["orders", "billing"])
    assert (await check(step, headers=bearer("good"))).allowed


async def test_answers_are_cached_by_token_capped_by_exp(
    steps: Steps, idp: IdpServer, clock: FakeClock, metrics: Metrics
) -> None:
    idp.state.tokens["short"] = {"active": True, "sub": "bob", "exp": int(time.time()) + 10}
    step = steps(cache_ttl_s=60)
    for _ in range(3):
        assert (await check(step, headers=bearer("short"))).allowed
        assert (await check(step, headers=bearer("good"))).allowed
    assert len(idp.state.introspections) == 2
    clock.advance(11)  # past the short token's exp, within the TTL of the other
    await check(step, headers=bearer("short"))
    await check(step, headers=bearer("good"))
    assert [c["form"]["token"] for c in idp.state.introspections] == ["short", "good", "short"]
    assert counter_value(metrics, "oauth2-introspection", "introspection_calls") == 3


async def test_inactive_answers_are_cached_briefly(steps: Steps, idp: IdpServer, clock: FakeClock) -> None:
    step = steps(inactive_cache_ttl_s=5)
    for _ in range(3):
        assert not (await check(step, headers=bearer("revoked"))).allowed
    assert len(idp.state.introspections) == 1
    clock.advance(6)
    await check(step, headers=bearer("revoked"))
    assert len(idp.state.introspections) == 2


async def test_concurrent_requests_with_one_token_share_one_call(steps: Steps, idp: IdpServer) -> None:
    idp.state.delay_s = 0.1
    step = steps()
    decisions = await asyncio.gather(*(check(step, headers=bearer("good")) for _ in range(10)))
    assert all(d.allowed for d in decisions)
    assert len(idp.state.introspections) == 1


async def test_missing_and_oversized_tokens_never_reach_the_endpoint(steps: Steps, idp: IdpServer) -> None:
    step = steps(max_token_bytes=64)
    assert (await check(step)).status == 401
    assert (await check(step, headers=bearer("x" * 65))).status == 401
    assert idp.state.introspections == []
    assert await steps(on_missing="abstain").check(check_context("/")) is None


async def test_an_answer_longer_than_max_response_bytes_is_an_error(
    steps: Steps, idp: IdpServer, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    idp.state.tokens["big"] = {"active": True, "sub": "alice", "groups": ["g" * 100] * 50}  # ~5 KiB
    step = steps(max_response_bytes=1024)
    with pytest.raises(RemoteTooLarge, match="larger than the 1024-byte cap"):
        await check(step, headers=bearer("big"))
    assert "raise max_response_bytes" in caplog.text
    assert counter_value(metrics, "oauth2-introspection", "remote_too_large") == 1
    assert not step._inflight  # nothing left running
    assert (await check(steps(), headers=bearer("big"))).allowed  # the default cap: 256 KiB


async def test_timeout_s_bounds_the_whole_call(steps: Steps, idp: IdpServer, metrics: Metrics) -> None:
    idp.state.delay_s = 2.0
    started = time.monotonic()
    with pytest.raises(RemoteTimeout):
        await check(steps(timeout_s=0.3), headers=bearer("good"))
    assert time.monotonic() - started < 1.0
    assert counter_value(metrics, "oauth2-introspection", "remote_timeouts") == 1


def test_limits_are_validated() -> None:
    base = {"endpoint": "https://idp.test/introspect", "client_id": "c", "client_secret_file": "s"}
    assert IntrospectionConfig.model_validate(base).max_response_bytes == 256 * 1024
    for bad in ({"max_response_bytes": 10}, {"timeout_s": 0}, {"timeout_s": 120}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            IntrospectionConfig.model_validate({**base, **bad})


async def test_the_credential_can_be_removed(steps: Steps) -> None:
    decision = await check(steps(remove_credential=True), headers=bearer("good"))
    assert decision.upstream_remove == ("authorization",)


# -- failures of the endpoint are errors, answered per on_error -----------------------------------


def policy(idp: IdpServer, folder: Path, extra: str = "", forward: str = "{}") -> str:
    return f"""
policies:
  p:
    error_reply: {{status: 503}}
    {extra}
    steps:
      - plugin: oauth2-introspection
        config:
          endpoint: {idp.introspection_url}
          client_id: gateway
          client_secret_file: {folder / "client-secret"}
          timeout_s: 5
          forward: {forward}
"""


@pytest.mark.parametrize("failure", ["down", "500"])
async def test_an_unreachable_or_failing_endpoint_is_an_error_not_an_allow(
    idp: IdpServer, secret_dir: Path, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = await runtime_of(policy(idp, secret_dir))
    if failure == "down":
        idp.stop()
    else:
        idp.state.introspection_status = 500
    deadline = asyncio.get_running_loop().time() + 5
    outcome = await runtime.policies["p"].evaluate(check_context("/", headers=bearer("good")), deadline)
    assert (outcome.label, outcome.decision.allowed, outcome.decision.status) == ("error", False, 503)
    assert "step 'oauth2-introspection' (oauth2-introspection) raised" in caplog.text
    await runtime.close()


async def test_on_error_allow_lets_the_request_through_without_any_identity(
    idp: IdpServer, secret_dir: Path
) -> None:
    runtime = await runtime_of(policy(idp, secret_dir, "on_error: allow", "{headers: {x-user: sub}}"))
    idp.stop()
    deadline = asyncio.get_running_loop().time() + 5
    request = check_context("/", headers={**bearer("good"), "x-user": "admin"})
    outcome = await runtime.policies["p"].evaluate(request, deadline)
    assert (outcome.label, outcome.decision.allowed) == ("error", True)
    assert outcome.decision.upstream_remove == ("x-user",)  # the client's own x-user is dropped
    await runtime.close()


async def test_a_slow_endpoint_is_cut_off_at_the_rpc_deadline(idp: IdpServer, secret_dir: Path) -> None:
    idp.state.delay_s = 2.0
    runtime = await runtime_of(policy(idp, secret_dir, "on_error: envoy"))
    started = time.monotonic()
    deadline = asyncio.get_running_loop().time() + 0.2  # what Envoy's 200 ms timeout leaves
    outcome = await runtime.policies["p"].evaluate(check_context("/", headers=bearer("good")), deadline)
    assert time.monotonic() - started < 1.0
    assert (outcome.label, outcome.envoy_error) == ("error", True)
    await runtime.close()


async def test_the_http_client_is_built_at_start_not_by_the_first_request(steps: Steps) -> None:
    step = steps()
    assert step._client is None
    await step.start()
    client = step._client
    assert client is not None  # the first request finds it ready: no CA bundle load on the loop
    await check(step, headers=bearer("anything"))
    assert step._client is client
