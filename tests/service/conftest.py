"""Shared pieces of the service tests: the real grpc.aio server on 127.0.0.1 with the scripted test
plugin (:mod:`extsvc.testing.scripted`), clients for gRPC and the admin listener, and ``extsvc``
subprocesses that are always killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extsvc.app import ExtsvcServer
from extsvc.plugin.host import BUILTIN_PLUGINS, PluginHost
from extsvc.testing import ScriptPlugin, authz_stub, check_request, running_server

EXTSVC = Path(sys.executable).parent / "extsvc"


# -- the `script` step (extsvc.testing.scripted) and the plugin host -----------------------------


@pytest.fixture
def script() -> ScriptPlugin:
    return ScriptPlugin()


#: The built-ins these tests configure; other built-ins are not needed to test the server.
BUILTINS = ("allow", "deny", "header-match", "set-headers")


def make_host(**plugins: object) -> PluginHost:
    """Some built-ins plus ``plugins``; no entry points, so every test sees the same set."""
    return PluginHost.create(
        builtins=[(name, module) for name, module in BUILTIN_PLUGINS if name in BUILTINS],
        extra_plugins=plugins.items(),
        load_entry_points=False,
    )


@pytest.fixture
def host(script: ScriptPlugin) -> PluginHost:
    return make_host(script=script)


# -- an in-process server and its clients -------------------------------------------------------


@dataclass
class Served:
    """A running :class:`ExtsvcServer` with a gRPC channel to it."""

    server: ExtsvcServer
    channel: grpc.aio.Channel

    async def check(
        self,
        path: str = "/",
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float = 5.0,
        **request: Any,
    ) -> Any:
        """One Check RPC; a failed RPC raises ``grpc.aio.AioRpcError``."""
        stub = authz_stub(self.channel)
        return await stub.Check(check_request(path, **request), metadata=metadata, timeout=timeout)

    async def admin(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(f"http://127.0.0.1:{self.server.admin_port}{path}")

    async def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """``/metrics`` over HTTP, as ``{(sample name, labels): value}``."""
        response = await self.admin("/metrics")
        assert response.status_code == 200
        return parse_metrics(response.text)

    def sample(self, name: str, **labels: str) -> float:
        """A metric read from the server's registry (0 when the series does not exist)."""
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @property
    def generation(self) -> int:
        runtime = self.server.holder.current
        return 0 if runtime is None else runtime.generation


Serve = Callable[..., AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve(host: PluginHost, tmp_path: Path) -> Serve:
    """``async with serve(config, **settings) as served`` -- see :func:`running_server`.

    YAML text is written to a file first, so the server's first load is that config
    (generation 1), not the embedded demo config followed by it.
    """

    @asynccontextmanager
    async def start(config: str | Path | None = None, **settings: Any) -> AsyncIterator[Served]:
        if isinstance(config, str):
            path = tmp_path / "served.yaml"
            path.write_text(config)
            config = path
        async with (
            running_server(config, host=host, **settings) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ):
            yield Served(server, channel)

    return start


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """The key of one series in :func:`parse_metrics`' result."""
    return name, frozenset(labels.items())


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout}s: {what or predicate}")
        await asyncio.sleep(0.02)


def write_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically (a new inode, as a Kubernetes ConfigMap update does)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- extsvc subprocesses ------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """An ``extsvc serve`` process; its stderr goes to ``log_path``."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int
    admin_port: int

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"extsvc exited with {self.popen.returncode}:\n{self.log}")
            try:
                if self.admin("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"extsvc not ready within {timeout}s:\n{self.log}")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not logged within {timeout}s:\n{self.log}")
            time.sleep(0.02)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without EXTSVC_* / PROMETHEUS_* settings, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("EXTSVC_", "PROMETHEUS_MULTIPROC"))
    }
    env.update(extra or {})
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``extsvc serve`` on free loopback ports; every process group is killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: Mapping[str, str] | None = None) -> Proc:
        grpc_port, admin_port = free_port(), free_port()
        log_path = tmp_path / f"extsvc-{len(started)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [
                    str(EXTSVC), "serve",
                    "--grpc-address", f"127.0.0.1:{grpc_port}",
                    "--admin-address", f"127.0.0.1:{admin_port}",
                    *args,
                ],
                stdout=log,
                stderr=log,
                env=clean_env(env),
                # Its own process group, so teardown also reaches --workers children.
                start_new_session=True,
            )
        started.append(popen)
        return Proc(popen, log_path, grpc_port, admin_port)

    yield start
    for popen in started:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(5)
        else:  # the leader is gone; its workers (same group) may not be
            with suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the installed ``extsvc`` console script to completion."""
    return subprocess.run(
        [str(EXTSVC), *args], capture_output=True, text=True, timeout=timeout, env=clean_env()
    )
