"""Readiness (gRPC health, /healthz, /readyz), /metrics and reflection on the real server."""

from __future__ import annotations

from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extsvc.authz.service import SERVICE_NAME as AUTHZ

from .conftest import Serve, Served, eventually, series, write_file

GOOD = """
default_policy: p
policies:
  p:
    steps:
      - plugin: header-match
        config:
          match: {path: {prefix: /public}}
          on_match: allow
      - plugin: deny
        config: {status: 401}
"""
# Fails validation: the status is not an HTTP status.
BAD = GOOD.replace("status: 401", "status: 99")


async def health(served: Served, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(served.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_not_serving_until_the_first_good_load_then_serving(
    serve: Serve, tmp_path: Path
) -> None:
    config = tmp_path / "extsvc.yaml"
    write_file(config, BAD)
    async with serve(config, reload_interval_s=0.05) as served:
        assert served.server.health.ready is False
        for service in ("", AUTHZ):
            assert await health(served, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        readyz = await served.admin("/readyz")
        assert readyz.status_code == 503
        assert "no config loaded yet" in readyz.text
        assert (await served.admin("/healthz")).status_code == 200  # alive, just not ready
        assert served.sample("extsvc_config_reloads_total", result="error") == 1

        write_file(config, GOOD)
        await eventually(lambda: served.generation == 1, what="the good file loaded")

        for service in ("", AUTHZ):
            assert await health(served, service) == health_pb2.HealthCheckResponse.SERVING
        readyz = await served.admin("/readyz")
        assert (readyz.status_code, readyz.text) == (200, "ready\n")
        assert served.sample("extsvc_config_reloads_total", result="ok") == 1


async def test_ready_after_a_good_first_load_and_not_ready_while_stopping(serve: Serve) -> None:
    async with serve(GOOD) as served:
        assert await health(served) == health_pb2.HealthCheckResponse.SERVING
        assert (await served.admin("/readyz")).status_code == 200
        await served.server.health.mark_draining()  # the first thing stop() does
        assert await health(served) == health_pb2.HealthCheckResponse.NOT_SERVING
        readyz = await served.admin("/readyz")
        assert (readyz.status_code, readyz.text) == (503, "not ready: shutting down\n")


async def test_metrics_endpoint_exports_decisions_step_durations_and_reloads(serve: Serve) -> None:
    async with serve(GOOD) as served:
        allowed = await served.check("/public/x")
        denied = await served.check("/private")
        assert (allowed.status.code, denied.denied_response.status.code) == (0, 401)

        response = await served.admin("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        metrics = await served.scrape()
    decisions = "extsvc_authz_decisions_total"
    assert metrics[series(decisions, policy="p", decision="allow")] == 1
    assert metrics[series(decisions, policy="p", decision="deny")] == 1
    durations = "extsvc_step_duration_seconds_count"
    # The allowed request stopped at header-match; the denied one went on to deny.
    assert metrics[series(durations, policy="p", plugin="header-match")] == 2
    assert metrics[series(durations, policy="p", plugin="deny")] == 1
    assert metrics[series("extsvc_config_reloads_total", result="ok")] == 1
    assert metrics[series("extsvc_config_generation")] == 1


async def test_metrics_carry_the_build_and_the_process_and_python_collectors(serve: Serve) -> None:
    from importlib.metadata import version
    from platform import python_version

    async with serve(GOOD) as served:
        metrics = await served.scrape()
    assert metrics[series("extsvc_build_info", version=version("extsvc"), python=python_version())] == 1
    assert metrics[series("python_gc_objects_collected_total", generation="0")] >= 0
    assert any(name == "python_info" for name, _ in metrics)
    assert metrics[series("process_resident_memory_bytes")] > 0


async def test_admin_status_and_unknown_paths(serve: Serve) -> None:
    async with serve(GOOD) as served:
        status = (await served.admin("/status")).json()
        missing = await served.admin("/nope")
    assert status["ready"] is True
    assert status["generation"] == 1
    assert status["policies"] == ["p"]
    assert status["default_policy"] == "p"
    assert {"allow", "deny", "header-match", "set-headers", "script"} <= {
        p["name"] for p in status["plugins"]
    }
    assert missing.status_code == 404


async def test_reflection_lists_authorization_and_health(serve: Serve) -> None:
    async with serve(GOOD) as served:
        stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"envoy.service.auth.v3.Authorization", "grpc.health.v1.Health"} <= names
