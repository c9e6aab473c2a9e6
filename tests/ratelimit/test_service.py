"""The RateLimitService on the real grpc.aio server: protocol, readiness, domain file reload."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extsvc.testing import running_server
from extsvc.testing.harness import wait_for_window_room

OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT

DOMAIN_A = """
domain: a
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 2, name: two}
"""
DOMAIN_B = """
domain: b
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 1}
"""


@pytest.fixture(autouse=True)
def _room_in_the_hour() -> None:
    """These tests count hour windows on the real clock: never across an hour's end."""
    wait_for_window_room(3600)


def request(domain: str, *descriptors: list[tuple[str, str]], hits: int = 0) -> Any:
    return rls_pb2.RateLimitRequest(
        domain=domain,
        hits_addend=hits,
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
            )
            for entries in descriptors
        ],
    )


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "a.yaml").write_text(DOMAIN_A)
    (tmp_path / "domains" / "b.yaml").write_text(DOMAIN_B)
    (tmp_path / "extsvc.yaml").write_text("version: 1\nratelimit: {config_dir: domains}\n")
    return tmp_path


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError


async def test_protocol_statuses_and_errors(config_dir: Path) -> None:
    async with running_server(config_dir / "extsvc.yaml") as server, grpc.aio.insecure_channel(
        f"127.0.0.1:{server.grpc_port}"
    ) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        answers = [await stub.ShouldRateLimit(request("a", [("k", "x")], [("other", "y")]))
                   for _ in range(3)]
        assert [a.overall_code for a in answers] == [OK, OK, OVER]
        first = answers[0].statuses
        assert len(first) == 2  # one status per descriptor, in order
        assert first[0].current_limit.name == "two" and first[0].current_limit.requests_per_unit == 2
        assert first[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.HOUR
        assert first[0].limit_remaining == 1
        assert 0 < first[0].duration_until_reset.seconds <= 3600
        assert first[1].code == OK and not first[1].HasField("current_limit")
        assert answers[2].statuses[0].code == OVER

        unknown = await stub.ShouldRateLimit(request("zzz", [("k", "x")]))
        assert unknown.overall_code == OK
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ShouldRateLimit(request("", [("k", "x")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_domain_files_reload_keep_last_good_and_reject_duplicates(config_dir: Path) -> None:
    domains = config_dir / "domains"
    async with running_server(config_dir / "extsvc.yaml", reload_interval_s=0.1) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)

        async def limit_of(domain: str, key: str = "k") -> int:
            answer = await stub.ShouldRateLimit(request(domain, [(key, "v")], hits=1))
            status = answer.statuses[0]
            return status.current_limit.requests_per_unit if status.HasField("current_limit") else -1

        assert await limit_of("b") == 1
        # A broken edit of b.yaml: b keeps its last good version, a is untouched.
        (domains / "b.yaml").write_text(DOMAIN_B.replace("unit: hour", "unit: fortnight"))
        await wait_for(lambda: _async(any("b.yaml" in p for p in server.ratelimit.problems)))
        assert any("descriptors[0].rate_limit.unit" in p for p in server.ratelimit.problems)
        assert await limit_of("b") == 1 and await limit_of("a") == 2
        # A new file defining domain "a" again is rejected naming both files.
        (domains / "c.yaml").write_text(DOMAIN_A.replace("requests_per_unit: 2", "requests_per_unit: 9"))
        await wait_for(lambda: _async(any("already defined" in p for p in server.ratelimit.problems)))
        problem = next(p for p in server.ratelimit.problems if "already defined" in p)
        assert "c.yaml: domain: 'a' is already defined in" in problem and "a.yaml" in problem
        assert await limit_of("a") == 2
        # Fixing b applies the new limits.
        (domains / "b.yaml").write_text(DOMAIN_B.replace("requests_per_unit: 1", "requests_per_unit: 7"))

        async def b_is_seven() -> bool:
            return await limit_of("b") == 7

        await wait_for(b_is_seven)
        assert server.metrics.registry.get_sample_value(
            "extsvc_ratelimit_domain_loads_total", {"result": "error"}) >= 2


async def _async(value: bool) -> bool:
    return value


async def test_no_ratelimit_section_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "extsvc.yaml").write_text("version: 1\n")
    async with running_server(tmp_path / "extsvc.yaml") as server, grpc.aio.insecure_channel(
        f"127.0.0.1:{server.grpc_port}"
    ) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ShouldRateLimit(request("a", [("k", "v")]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_validate_reports_domain_file_problems(config_dir: Path) -> None:
    import subprocess
    import sys

    bad = "domain: b\ndescriptors:\n  - key: k\n    rate_limit: {}\n"
    (config_dir / "domains" / "b.yaml").write_text(bad)
    done = subprocess.run([sys.executable, "-m", "extsvc", "validate", str(config_dir / "extsvc.yaml")],
                          capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 1
    assert "b.yaml: descriptors[0].rate_limit: unit is required" in done.stdout + done.stderr


async def test_a_config_reload_never_leaves_the_service_without_limits(config_dir: Path) -> None:
    # Every config load re-applies the ratelimit section; while its domain files are read (off
    # the event loop) calls must still be answered by the limits serving, never UNAVAILABLE.
    config = config_dir / "extsvc.yaml"
    async with running_server(config, reload_interval_s=0.02) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        errors: list[str] = []
        stop = asyncio.Event()

        async def call_all_the_time() -> int:
            calls = 0
            while not stop.is_set():
                try:
                    await stub.ShouldRateLimit(request("a", [("k", "v")]), timeout=2)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                calls += 1
            return calls

        callers = [asyncio.create_task(call_all_the_time()) for _ in range(4)]
        for generation in range(2, 8):
            config.write_text(f"version: 1\n# {generation}\nratelimit: {{config_dir: domains}}\n")
            await wait_for(lambda g=generation: _async(server.loader.generation >= g))
        stop.set()
        assert sum(await asyncio.gather(*callers)) > 0
        assert errors == []
