"""Shared pieces of the unit tests: a scriptable test plugin and a host that registers it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import compile_config, parse
from extsvc.reload.runtime import Runtime


class ScriptConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    answer: Literal["allow", "deny", "abstain", "raise", "sleep", "bad"] = "abstain"
    status: int = Field(403, ge=200, le=599)
    body: str = ""
    upstream: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    sleep_s: float = 10.0
    fail_start: bool = False


class Scripted:
    """A step whose answer comes from its config; it records what happens to it."""

    def __init__(self, config: ScriptConfig, ctx: PluginContext, plugin: ScriptPlugin) -> None:
        self.config = config
        self.ctx = ctx
        self.plugin = plugin
        self.started = False
        self.closed = False
        plugin.built.append(self)

    async def start(self) -> None:
        if self.config.fail_start:
            raise RuntimeError("cannot reach the key server")
        self.started = True

    async def aclose(self) -> None:
        self.closed = True
        self.plugin.closed.append(self.ctx.step)

    async def check(self, request: CheckContext, /) -> Any:
        self.plugin.calls.append(self.ctx.step)
        answer = self.config.answer
        if answer == "allow":
            return Decision.allow(
                upstream_set=self.config.upstream, metadata=self.config.metadata, reason=self.ctx.step
            )
        if answer == "deny":
            return Decision.deny(self.config.status, self.config.body, reason=self.ctx.step)
        if answer == "raise":
            raise RuntimeError("boom")
        if answer == "sleep":
            await asyncio.sleep(self.config.sleep_s)
            return Decision.allow(reason="woke up")
        if answer == "bad":
            return "allow"
        return None


class ScriptPlugin:
    """Registers the ``script`` kind; one instance per test keeps its own records."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.built: list[Scripted] = []
        self.closed: list[str] = []

    @hookimpl
    def extsvc_register_authorizers(self) -> Iterator[AuthorizerType[Any]]:
        yield AuthorizerType(
            name="script",
            config_model=ScriptConfig,
            factory=lambda config, ctx: Scripted(config, ctx, self),
            description="answers as its config says",
        )


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
