"""The rate-limit service through a real Envoy 1.40: 429s, x-ratelimit-* headers, route actions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, wait_for_window_room
from ratelimit.servers import RedisServer

from .conftest import HERE, StartEnvoy

API_LIMIT = '3, 3;w=3600;name="api", 1000;w=3600;name="remote_address"'


@pytest.fixture(autouse=True)
def _room_in_the_hour() -> None:
    """These tests count hour windows on the real clock: never across an hour's end."""
    wait_for_window_room(3600)


@pytest.fixture(scope="module", params=["memory", "redis"])
def extsvc_rl(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExtsvcProcess]:
    """The same suite on the memory store and on a real Redis."""
    config = HERE / "ratelimit-config.yaml"
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.cli("flushall")
        text = config.read_text(encoding="utf-8").replace(
            "store: {type: memory}", f"store: {{type: redis, url: '{redis.url}'}}"
        ).replace("config_dir: ratelimit", f"config_dir: {HERE / 'ratelimit'}")
        assert redis.url in text
        config = tmp_path_factory.mktemp("rl") / "ratelimit-config.yaml"
        config.write_text(text, encoding="utf-8")
    with ExtsvcProcess(config) as server:
        yield server


@pytest.fixture(scope="module")
def rl_envoy(start_envoy: StartEnvoy, extsvc_rl: ExtsvcProcess) -> EnvoyProcess:
    return start_envoy(HERE / "envoy-ratelimit.yaml", extsvc_rl.grpc_port)


def fresh_key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def test_generic_key_and_request_header_limit_then_429(
    rl_envoy: EnvoyProcess, backend: EchoBackend
) -> None:
    key = fresh_key()
    remaining = []
    for _ in range(3):
        response = httpx.get(rl_envoy.url("/items"), headers={"x-api-key": key})
        assert response.status_code == 200, response.text
        assert response.headers["x-backend"] == "echo"
        assert response.headers["x-ratelimit-limit"] == API_LIMIT
        remaining.append(response.headers["x-ratelimit-remaining"])
        assert 0 < int(response.headers["x-ratelimit-reset"]) <= 3600
    assert remaining == ["2", "1", "0"]

    before = len(backend.requests)
    limited = httpx.get(rl_envoy.url("/items"), headers={"x-api-key": key})
    assert limited.status_code == 429
    assert limited.headers["x-envoy-ratelimited"] == "true"
    assert limited.headers["x-ratelimit-limit"] == API_LIMIT
    assert limited.headers["x-ratelimit-remaining"] == "0"
    # The over_limit reply of the extsvc config: body, its content-type and a header.
    assert limited.text == '{"error":"rate limited by extsvc"}'
    assert limited.headers["content-type"] == "application/json"
    assert limited.headers["x-rls"] == "extsvc"
    assert len(backend.requests) == before  # never reached the backend

    # Another API key has its own counter.
    assert httpx.get(rl_envoy.url("/items"), headers={"x-api-key": fresh_key()}).status_code == 200


def test_exact_value_beats_the_default_and_a_limitless_value_whitelists(
    rl_envoy: EnvoyProcess,
) -> None:
    vip = [httpx.get(rl_envoy.url("/items"), headers={"x-api-key": "vip"}) for _ in range(6)]
    assert [r.status_code for r in vip] == [200] * 5 + [429]
    assert vip[0].headers["x-ratelimit-limit"].split(", ")[1] == '5;w=3600;name="vip"'
    assert vip[0].headers["x-ratelimit-remaining"] == "4"

    # api_key=free has no rate_limit: only the remote_address limit applies.
    free = [httpx.get(rl_envoy.url("/items"), headers={"x-api-key": "free"}) for _ in range(5)]
    assert {r.status_code for r in free} == {200}
    assert free[0].headers["x-ratelimit-limit"].endswith('1000;w=3600;name="remote_address"')
    assert free[0].headers["x-ratelimit-limit"].count(";w=") == 1


def test_without_the_header_only_the_remote_address_descriptor_is_sent(rl_envoy: EnvoyProcess) -> None:
    response = httpx.get(rl_envoy.url("/items"))
    assert response.status_code == 200
    limit = response.headers["x-ratelimit-limit"]
    assert limit.startswith("1000, ") and limit.endswith('1000;w=3600;name="remote_address"')
    assert int(response.headers["x-ratelimit-remaining"]) < 1000


def test_generic_key_with_remote_address(rl_envoy: EnvoyProcess) -> None:
    answers = [httpx.get(rl_envoy.url("/ip/x")) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit"] == '2, 2;w=3600;name="per-ip"'
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["1", "0", "0"]


def test_unlimited_vhost_policy_sends_no_limit_headers(rl_envoy: EnvoyProcess) -> None:
    for _ in range(3):
        response = httpx.get(rl_envoy.url("/public/x"))
        assert response.status_code == 200
        assert "x-ratelimit-limit" not in response.headers


def test_metrics_count_hits_and_over_limit(rl_envoy: EnvoyProcess, extsvc_rl: ExtsvcProcess) -> None:
    key = fresh_key()
    for _ in range(4):
        httpx.get(rl_envoy.url("/items"), headers={"x-api-key": key})
    assert extsvc_rl.metric("extsvc_ratelimit_over_limit_total", domain="gateway", limit="api") >= 1
    assert extsvc_rl.metric("extsvc_ratelimit_hits_total", domain="gateway", limit="api") >= 4
    assert extsvc_rl.metric("extsvc_ratelimit_responses_total", code="over_limit") >= 1
    stats = rl_envoy.stats("cluster.backend.ratelimit.")
    assert stats.get("cluster.backend.ratelimit.over_limit", 0) >= 1
    assert stats.get("cluster.backend.ratelimit.error", 0) == 0
