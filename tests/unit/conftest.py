"""Shared pieces of the unit tests: the scripted test plugin (:mod:`extsvc.testing.scripted`) and a
host that registers it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse
from extsvc.reload.runtime import Runtime
from extsvc.testing.scripted import ScriptPlugin


@pytest.fixture
def script() -> ScriptPlugin:
    return ScriptPlugin()


@pytest.fixture
def host(script: ScriptPlugin) -> PluginHost:
    """The built-in plugins plus ``script``; no entry points, so the test sees a fixed set."""
    return PluginHost.create(extra_plugins=[("script", script)], load_entry_points=False)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


CompileYaml = Callable[[str], Awaitable[Runtime]]


@pytest.fixture
def compile_yaml(host: PluginHost, metrics: Metrics) -> CompileYaml:
    """YAML text -> a started :class:`Runtime` built with ``host`` and ``metrics``."""

    async def build(text: str) -> Runtime:
        return await compile_config(parse(text), host, metrics)

    return build
