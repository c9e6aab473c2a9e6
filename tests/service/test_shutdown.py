"""Graceful stop of the in-process server: in-flight RPCs finish within the grace period."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from extsvc import hookimpl
from extsvc.settings import Settings
from extsvc.testing import ScriptPlugin, authz_stub, check_request, running_server

from .conftest import Serve, eventually, make_host

SLOW = """
default_policy: p
policies:
  p:
    steps: [{{plugin: script, config: {{answer: {answer}, sleep_s: 30, tag: done}}}}]
"""


async def test_stop_lets_an_in_flight_check_finish_and_refuses_new_ones(
    serve: Serve, script: ScriptPlugin
) -> None:
    async with serve(SLOW.format(answer="wait")) as served:
        in_flight = asyncio.create_task(served.check(timeout=10))
        await asyncio.wait_for(script.entered.wait(), 5)
        stopping = asyncio.create_task(served.server.stop(grace=5))
        await eventually(lambda: not served.server.health.ready, what="draining")

        readyz = await served.admin("/readyz")  # the admin port stays up until the end
        assert (readyz.status_code, readyz.text) == (503, "not ready: shutting down\n")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.server.grpc_port}") as late:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await authz_stub(late).Check(check_request(), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not stopping.done()

        script.release.set()
        response = await in_flight
        await stopping
    assert response.status.code == 0
    assert {h.header.key: h.header.value for h in response.ok_response.headers} == {"x-tag": "done"}
    assert script.closed == ["done"]  # plugins closed after the last request


async def test_the_grace_period_bounds_the_wait(serve: Serve, script: ScriptPlugin) -> None:
    async with serve(SLOW.format(answer="sleep")) as served:
        in_flight = asyncio.create_task(served.check(timeout=10))
        await asyncio.wait_for(script.entered.wait(), 5)
        started = time.monotonic()
        await served.server.stop(grace=0.2)
        assert time.monotonic() - started < 2
        with pytest.raises(grpc.aio.AioRpcError):
            await in_flight


class Lifecycle:
    """Records the lifecycle hooks as the server calls them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    async def extsvc_startup(self, settings: Settings) -> None:
        self.calls.append("startup")

    @hookimpl
    async def extsvc_shutdown(self) -> None:
        self.calls.append("shutdown")


async def test_startup_and_shutdown_hooks_run_once_even_when_stop_is_called_again(
    script: ScriptPlugin, tmp_path: Path
) -> None:
    hooks = Lifecycle()
    host = make_host(script=script, lifecycle=hooks)
    config = tmp_path / "extsvc.yaml"
    config.write_text(SLOW.format(answer="allow"))
    async with running_server(config, host=host) as server:
        assert hooks.calls == ["startup"]
        await server.stop()  # e.g. a test of graceful stop; running_server stops it again
    assert hooks.calls == ["startup", "shutdown"]
