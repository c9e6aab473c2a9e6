r"""A test plugin whose steps and processors do what their config says, and record what happened.

Register :class:`ScriptPlugin` to test what surrounds a plugin -- how a policy combines answers,
on_error, deadlines, reloads, shutdown, an ext_proc stream -- without writing a plugin per case.
It provides the ``script`` authorizer kind (:class:`ScriptStepConfig`) and the ``script``
processor kind (:class:`ScriptProcessorConfig`); one instance per test keeps its own records::

    import grpc

    from extsvc.plugin.host import PluginHost
    from extsvc.testing import ScriptPlugin, authz_stub, check_request, running_server

    POLICY = "default_policy: p\npolicies: {p: {steps: [{plugin: script, name: s, config: {answer: raise}}]}}"

    async def test_a_raising_step_is_answered_per_on_error():
        script = ScriptPlugin()
        host = PluginHost.create(extra_plugins=[("script", script)], load_entry_points=False)
        async with running_server(POLICY, host=host) as server, grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}"
        ) as channel:
            response = await authz_stub(channel).Check(check_request("/"))
        assert response.denied_response.status.code == 503  # on_error: deny, the default error_reply
        assert script.calls == ["s"]
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from extsvc.extproc.model import HeaderChanges, HttpMessage, Phase, Processor
from extsvc.plugin.check import CheckContext, Decision
from extsvc.plugin.context import PluginContext
from extsvc.plugin.markers import hookimpl
from extsvc.plugin.records import AuthorizerType, ProcessorType

__all__ = [
    "HookCall",
    "ScriptPlugin",
    "ScriptProcessorConfig",
    "ScriptStepConfig",
    "ScriptedProcessor",
    "ScriptedStep",
]


class ScriptStepConfig(BaseModel):
    """The ``config:`` of a ``script`` step (ext_authz).

    ``answer``: ``allow`` (with ``upstream``, ``metadata`` and, when ``tag`` is set, an ``x-tag``
    upstream header), ``deny`` (``status``, ``body``), ``abstain``, ``raise``
    (``RuntimeError("boom")``), ``sleep`` (``sleep_s``, then allow), ``wait`` (until
    :attr:`ScriptPlugin.release` is set, then allow) or ``bad`` (returns something that is not a
    Decision).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    answer: Literal["allow", "deny", "abstain", "raise", "sleep", "wait", "bad"] = "abstain"
    status: int = Field(403, ge=200, le=599)
    body: str = ""
    upstream: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    sleep_s: float = 10.0
    #: names the step in ``x-tag`` and in :attr:`ScriptPlugin.closed` (default: the step's name)
    tag: str = ""
    #: ``start()`` raises, as a step that cannot reach what it needs
    fail_start: bool = False


class ScriptedStep:
    """A ``script`` step: answers as its config says."""

    def __init__(self, config: ScriptStepConfig, ctx: PluginContext, plugin: ScriptPlugin) -> None:
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
        self.plugin.closed.append(self.config.tag or self.ctx.step)

    async def check(self, request: CheckContext, /) -> Decision | None:
        self.plugin.calls.append(self.ctx.step)
        self.plugin.entered.set()
        c = self.config
        if c.answer == "abstain":
            return None
        if c.answer == "deny":
            return Decision.deny(c.status, c.body, reason=self.ctx.step)
        if c.answer == "raise":
            raise RuntimeError("boom")
        if c.answer == "bad":
            return "allow"  # type: ignore[return-value]  # deliberately not a Decision
        if c.answer == "sleep":
            await asyncio.sleep(c.sleep_s)
        elif c.answer == "wait":
            await self.plugin.release.wait()
        upstream = {"x-tag": c.tag} if c.tag else {}
        return Decision.allow(
            upstream_set={**upstream, **c.upstream}, metadata=c.metadata, reason=self.ctx.step
        )


class ScriptProcessorConfig(BaseModel):
    """The ``config:`` of a ``script`` processor (ext_proc): its hooks for ``phases`` make these
    changes, in this order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phases: list[Phase]
    #: ``Processor.reads`` and ``Processor.whole_bodies``
    reads: list[Phase] = Field(default_factory=list)
    whole_bodies: list[Phase] = Field(default_factory=list)
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


class HookCall(NamedTuple):
    """One hook call of a ``script`` processor, with the message as the hook received it."""

    step: str
    phase: Phase
    headers: dict[str, str]
    body: bytes


class ScriptedProcessor(Processor):
    """A ``script`` processor: its hooks for ``config.phases`` change the message as configured."""

    def __init__(self, config: ScriptProcessorConfig, ctx: PluginContext, plugin: ScriptPlugin) -> None:
        self.config = config
        self.label = ctx.step
        self.plugin = plugin
        self.phases = frozenset(config.phases)
        self.reads = frozenset(config.reads)
        self.whole_bodies = frozenset(config.whole_bodies)
        for phase in config.phases:
            setattr(self, f"on_{phase.value}", self._run)

    def fixed_headers(self, phase: Phase, /) -> HeaderChanges | None:
        c = self.config
        if c.fixed_raises:
            raise ValueError("no idea")
        if c.fixed_wrong_type:
            return {"x": "y"}  # type: ignore[return-value]  # deliberately not HeaderChanges
        if not c.fixed:
            return None
        return HeaderChanges(set=c.set, add=c.append, remove=c.remove)

    async def _run(self, message: HttpMessage, /) -> None:
        c = self.config
        self.plugin.processed.append(HookCall(self.label, message.phase, dict(message.headers), message.body))
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
    """Registers the ``script`` authorizer and processor kinds and records what their steps do.

    - ``calls``: the names of the steps whose ``check`` ran, in order.
    - ``built``: every :class:`ScriptedStep` built (``.started``, ``.closed``, ``.ctx``).
    - ``closed``: the tag (or name) of each step closed, in order.
    - ``entered``: set when any step starts a check; ``wait`` steps hold until ``release`` is set.
    - ``processed``: a :class:`HookCall` for each processor hook that ran, in order.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.built: list[ScriptedStep] = []
        self.closed: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.processed: list[HookCall] = []

    @hookimpl
    def extsvc_register_authorizers(self) -> Iterator[AuthorizerType[Any]]:
        yield AuthorizerType(
            name="script",
            config_model=ScriptStepConfig,
            factory=lambda config, ctx: ScriptedStep(config, ctx, self),
            description="answers as its config says",
        )

    @hookimpl
    def extsvc_register_processors(self) -> Iterator[ProcessorType[Any]]:
        yield ProcessorType(
            name="script",
            config_model=ScriptProcessorConfig,
            factory=lambda config, ctx: ScriptedProcessor(config, ctx, self),
            description="changes messages as its config says",
        )
