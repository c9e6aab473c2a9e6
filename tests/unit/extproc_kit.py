"""A scriptable ext_proc processor for the unit tests, and helpers to read answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extsvc import (
    HeaderChanges,
    HttpMessage,
    Phase,
    PluginContext,
    Processor,
    ProcessorType,
    hookimpl,
)
from extsvc.extproc.stream import ExtprocStream
from extsvc.plugin.host import PluginHost
from extsvc.testing.extproc import stream_for


class ScriptConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: list[Phase]
    set: dict[str, str] = Field(default_factory=dict)
    append: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)
    body: str | None = None
    upper: bool = False
    clear_body: bool = False
    respond: int | None = None
    fail: bool = False
    sleep_s: float = 0.0
    replace: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    route_cache: bool = False
    #: answer fixed_headers with set/append/remove (headers phases)
    fixed: bool = False
    #: fixed_headers raises / returns something else (config errors)
    fixed_raises: bool = False
    fixed_wrong_type: bool = False


class Scripted(Processor):
    def __init__(self, config: ScriptConfig, ctx: PluginContext, plugin: ScriptPlugin) -> None:
        self.config = config
        self.label = ctx.step
        self.plugin = plugin
        self.phases = frozenset(config.phases)
        for phase in config.phases:
            setattr(self, f"on_{phase.value}", self._run)

    def fixed_headers(self, phase: Phase, /) -> HeaderChanges | None:
        c = self.config
        if c.fixed_raises:
            raise ValueError("no idea")
        if c.fixed_wrong_type:
            return {"x": "y"}  # type: ignore[return-value]
        if not c.fixed:
            return None
        return HeaderChanges(set=c.set, add=c.append, remove=c.remove)

    async def _run(self, message: HttpMessage, /) -> None:
        c = self.config
        self.plugin.calls.append((self.label, message.phase, dict(message.headers), message.body))
        for name in c.remove:
            message.remove_header(name)
        for name, value in c.set.items():
            message.set_header(name, value)
        for name, value in c.append.items():
            message.append_header(name, value)
        if c.upper:
            message.set_body(message.body.upper())
        if c.body is not None:
            message.set_body(c.body.encode())
        if c.clear_body:
            message.clear_body()
        for key, value in c.metadata.items():
            message.set_metadata("ext_proc.demo", key, value)
        if c.route_cache:
            message.clear_route_cache()
        if c.replace:
            message.continue_and_replace()
        if c.sleep_s:
            await asyncio.sleep(c.sleep_s)
        if c.fail:
            raise RuntimeError("boom")
        if c.respond is not None:
            message.respond(c.respond, "stopped\n", {"x-stopped-by": self.label}, details="scripted")


class ScriptPlugin:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Phase, dict[str, str], bytes]] = []

    @hookimpl
    def extsvc_register_processors(self) -> Iterator[ProcessorType[Any]]:
        yield ProcessorType(
            name="script", config_model=ScriptConfig,
            factory=lambda config, ctx: Scripted(config, ctx, self),
        )


def script_host(plugin: ScriptPlugin) -> PluginHost:
    return PluginHost.create(extra_plugins=[("script", plugin)], load_entry_points=False)


async def scripted_stream(
    plugin: ScriptPlugin, policy_yaml: str, **kwargs: Any
) -> ExtprocStream:
    """A stream whose default policy ``p`` is ``policy_yaml`` (the body of ``policies.p``)."""
    indented = "\n".join("      " + line for line in policy_yaml.strip().splitlines())
    config = f"extproc:\n  default_policy: p\n  policies:\n    p:\n{indented}\n"
    return await stream_for(config, host=script_host(plugin), **kwargs)


def which(response: Any) -> str:
    return str(response.WhichOneof("response"))


def common(response: Any) -> Any:
    return getattr(response, which(response)).response


def set_headers(mutation: Any) -> list[tuple[str, bytes, bool]]:
    """(key, raw_value, append) of each set_headers entry; asserts ``value`` is never used."""
    out = []
    for option in mutation.set_headers:
        assert option.header.value == "", "ext_proc header values must go in raw_value only"
        out.append((option.header.key, option.header.raw_value, option.append.value))
    return out
