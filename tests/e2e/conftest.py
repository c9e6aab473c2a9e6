"""Fixtures for end-to-end tests: a real Envoy 1.40 in front of ``extsvc serve`` and an echo backend.

The parts live in :mod:`extsvc.testing.harness`; these fixtures wire them together. Every test
under ``tests/e2e`` is marked ``envoy``. Reuse ``start_envoy`` with any Envoy config written for
the fixed ports 10000 (listener), 8081 (backend), 9001 (extsvc), 9901 (admin).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port, with_ports
from ratelimit.servers import RedisServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

StartEnvoy = Callable[..., EnvoyProcess]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.envoy)


@pytest.fixture(scope="session")
def backend() -> Iterator[EchoBackend]:
    with EchoBackend() as server:
        yield server


@pytest.fixture(scope="module")
def start_envoy(backend: EchoBackend) -> Iterator[StartEnvoy]:
    """``start_envoy(config_path_or_text, extsvc_port)``: a running Envoy, stopped after the module."""
    started: list[EnvoyProcess] = []

    def start(config: Path | str, extsvc_port: int, **ports: int) -> EnvoyProcess:
        text = config.read_text(encoding="utf-8") if isinstance(config, Path) else config
        mapping = {10000: free_port(), 8081: backend.port, 9001: extsvc_port, 9901: free_port()}
        mapping.update({int(k.lstrip("p")): v for k, v in ports.items()})
        envoy = EnvoyProcess(with_ports(text, mapping)).start()
        started.append(envoy)
        return envoy

    yield start
    for envoy in started:
        envoy.__exit__(None, None, None)


@pytest.fixture(scope="module")
def extsvc_authz() -> Iterator[ExtsvcProcess]:
    """``extsvc serve`` with tests/e2e/authz-policies.yaml."""
    with ExtsvcProcess(HERE / "authz-policies.yaml") as server:
        yield server


@pytest.fixture(scope="module")
def authz_envoy(start_envoy: StartEnvoy, extsvc_authz: ExtsvcProcess) -> EnvoyProcess:
    return start_envoy(HERE / "envoy-authz.yaml", extsvc_authz.grpc_port)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the tests' own on a free loopback port (never the machine's 6379)."""
    server = RedisServer().start()
    yield server
    server.close()
