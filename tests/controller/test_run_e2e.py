"""End to end, live: ``extsvc-controller run`` on a folder of manifests feeds a real Envoy 1.40 over
ADS (its bootstrap from ``render --xds``), in front of a real ``extsvc serve`` and an echo
backend; editing a manifest changes what Envoy does, without a restart."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port
from extsvc_controller.cli import main
from extsvc_controller.render import load_endpoints
from extsvc_controller.serve import RunConfig, Running

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "controller"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_folder_edit_reaches_envoy_over_ads(tmp_path: Path, delta: bool) -> None:
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLE / "manifests", folder)
    listen = free_port()
    with EchoBackend() as backend, ExtsvcProcess(EXAMPLE / "extsvc.yaml") as extsvc:
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(
            f"services:\n  demo/extsvc: 127.0.0.1:{extsvc.grpc_port}\n"
            f"  demo/backend: 127.0.0.1:{backend.port}\n"
            f"listeners:\n  '80': 127.0.0.1:{listen}\n"
        )
        running = Running(RunConfig(
            paths=[folder],
            options=load_endpoints(endpoints),
            xds_address=("127.0.0.1", 0),
            admin_address=("127.0.0.1", 0),
            status_file=tmp_path / "status.yaml",
            poll_interval_s=0.05,
            debounce_s=0.02,
        ))
        await running.start()
        try:
            boot = tmp_path / "envoy.yaml"
            argv = ["render", "--xds", f"127.0.0.1:{running.xds_port}", "--gateway", "demo/gw",
                    "--admin", f"127.0.0.1:{free_port()}", "-o", str(boot)]
            assert main([*argv, "--delta"] if delta else argv) == 0
            proxy = EnvoyProcess(boot.read_text())
            proxy.port = listen  # the listener comes over LDS; the bootstrap only names the server
            # start() polls Envoy's /ready: off the event loop that serves xDS
            await asyncio.to_thread(proxy.start)
            try:
                async with httpx.AsyncClient(base_url=proxy.url("")) as client:
                    denied = await client.get("/anything")
                    assert denied.status_code == 401, denied.text  # ext_authz, Gateway-wide
                    ok = await client.get("/anything", headers={"x-user": "ann"})
                    assert ok.status_code == 200 and backend.requests[-1].headers["x-extproc"] == "on"
                    # the Gateway-wide extAuth goes away in the manifests: Envoy lets them in
                    policies = folder / "policies.yaml"
                    text = policies.read_text()
                    policies.write_text(text.replace(
                        "  extAuth:\n    extensionRef: {name: authz}\n"
                        "    contextExtensions: {extsvc-policy: members}\n", ""
                    ))

                    async def open_now() -> bool:
                        # /anything: rule `rest`, no rate limit (/orders has 3 an hour)
                        return (await client.get("/anything")).status_code == 200

                    await eventually(open_now, 20, "the edit reached Envoy")
                    # a manifest that cannot be read keeps the last good config serving
                    (folder / "broken.yaml").write_text("kind: [unclosed\n")
                    await asyncio.sleep(0.5)
                    assert (await client.get("/anything")).status_code == 200
                    assert running.cache.nodes.all(), "the Envoy is connected"
            finally:
                await asyncio.to_thread(proxy.stop)
            assert "kind: HTTPRoute" in (tmp_path / "status.yaml").read_text()
        finally:
            await running.stop()
