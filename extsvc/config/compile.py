"""Config -> runtime objects: parse, validate, compile (the server and ``extsvc validate``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from extsvc.authz.model import Decision
from extsvc.authz.pipeline import CompiledPolicy, CompiledStep
from extsvc.config.model import AuthzPolicy, ExtsvcConfig, Reply
from extsvc.config.runtime import Runtime
from extsvc.errors import ConfigError
from extsvc.extproc.model import HeaderChanges, Phase, declared_phases, hook_name
from extsvc.extproc.pipeline import CompiledExtprocPolicy, CompiledProcessor, ExtprocPolicies
from extsvc.observability.metrics import Metrics
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.host import PluginHost
from extsvc.plugin.protocols import Authorizer, IdentitySource, Startable
from extsvc.ratelimit.config import StoreType

log = logging.getLogger(__name__)


def parse(text: str, *, source: str = "<config>") -> ExtsvcConfig:
    """YAML text -> validated :class:`ExtsvcConfig` (plugin blocks not yet checked)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        # An empty document is never a deliberate config, but it is what a watcher sees between
        # an editor's truncate and its write: rejecting it keeps the last good config serving.
        raise ConfigError(f"{source}: the config is empty (expected at least one section)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ExtsvcConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``dotted.path[0].field: message`` line per problem."""
    lines = []
    for error in exc.errors():
        path = prefix
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{part}" if path else str(part)
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '(top level)'}: {message}")
    return lines


def check_plugins(config: ExtsvcConfig, host: PluginHost) -> dict[tuple[str, int], BaseModel]:
    """Validate every step's (and ext_proc processor's, and a plugin limit store's) kind and
    config; all problems at once.

    Returns the validated ext_authz step configs by ``(policy, index)``.
    """
    problems: list[str] = []
    validated = _check_steps(config, host, problems)
    _check_processors(config, host, problems)
    _check_limit_store(config, host, problems)
    if problems:
        raise ConfigError(problems)
    return validated


def check_processors(config: ExtsvcConfig, host: PluginHost) -> dict[tuple[str, int], BaseModel]:
    """Validate the ``extproc:`` processors; their configs by ``(policy, index)``."""
    problems: list[str] = []
    validated = _check_processors(config, host, problems)
    if problems:
        raise ConfigError(problems)
    return validated


def _check_processors(
    config: ExtsvcConfig, host: PluginHost, problems: list[str]
) -> dict[tuple[str, int], BaseModel]:
    validated: dict[tuple[str, int], BaseModel] = {}
    for policy_name, policy in config.extproc.policies.items():
        for index, step in enumerate(policy.processors):
            where = f"extproc.policies.{policy_name}.processors[{index}]"
            kind = host.processors.get(step.plugin)
            if kind is None:
                known = ", ".join(sorted(host.processors)) or "none"
                problems.append(
                    f"{where}.plugin: unknown processor kind {step.plugin!r} (known: {known})"
                )
                continue
            try:
                validated[(policy_name, index)] = kind.config_model.model_validate(step.config)
            except ValidationError as exc:
                problems.extend(format_validation_error(exc, f"{where}.config"))
    return validated


def _check_limit_store(config: ExtsvcConfig, host: PluginHost, problems: list[str]) -> None:
    """``ratelimit.store`` with ``type: plugin``: a known store, a config its model accepts.

    Checked here, with the rest of the config, so a mistake rejects the whole config (the last
    good one keeps serving); the rate-limit manager builds the store once the config serves.
    """
    store = config.ratelimit.store if config.ratelimit is not None else None
    if store is None or store.type is not StoreType.PLUGIN:
        return
    where = "ratelimit.store"
    kind = host.limit_stores.get(store.plugin or "")
    if kind is None:
        known = ", ".join(sorted(host.limit_stores)) or "none"
        problems.append(f"{where}.plugin: unknown limit store {store.plugin!r} (known: {known})")
        return
    try:
        kind.config_model.model_validate(store.config)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, f"{where}.config"))


def _check_steps(
    config: ExtsvcConfig, host: PluginHost, problems: list[str]
) -> dict[tuple[str, int], BaseModel]:
    validated: dict[tuple[str, int], BaseModel] = {}
    for policy_name, policy in config.policies.items():
        for index, step in enumerate(policy.steps):
            where = f"policies.{policy_name}.steps[{index}]"
            kind = host.authorizers.get(step.plugin)
            if kind is None:
                known = ", ".join(sorted(host.authorizers)) or "none"
                problems.append(f"{where}.plugin: unknown plugin kind {step.plugin!r} (known: {known})")
                continue
            try:
                validated[(policy_name, index)] = kind.config_model.model_validate(step.config)
            except ValidationError as exc:
                problems.extend(format_validation_error(exc, f"{where}.config"))
    return validated


def _reply_decision(reply: Reply) -> Decision:
    return Decision.deny(reply.status, reply.body, reply.headers)


async def compile_config(
    config: ExtsvcConfig,
    host: PluginHost,
    metrics: Metrics,
    *,
    base_dir: Path = Path(),
    generation: int = 0,
    start: bool = True,
) -> Runtime:
    """Build every policy's steps (and ``start()`` them unless ``start`` is false).

    On any failure the steps built so far are closed and a :class:`ConfigError` naming the step
    is raised; nothing half-built escapes.
    """
    validated = check_plugins(config, host)
    processor_configs = check_processors(config, host)
    policies: dict[str, CompiledPolicy] = {}
    built: list[Authorizer] = []
    processors: list[object] = []
    try:
        for policy_name, policy in config.policies.items():
            policies[policy_name] = await _compile_policy(
                policy_name, policy, validated, host, metrics, base_dir, built, start
            )
        extproc = await compile_extproc(
            config, processor_configs, host, metrics, base_dir, processors, start
        )
    except BaseException:
        await Runtime.close_authorizers(built)
        await Runtime.close_authorizers(processors)  # type: ignore[arg-type]
        raise
    return Runtime(
        config=config,
        policies=policies,
        authorizers=tuple(built),
        generation=generation,
        metrics=metrics,
        extproc=extproc,
    )


async def compile_extproc(
    config: ExtsvcConfig,
    validated: Mapping[tuple[str, int], BaseModel],
    host: PluginHost,
    metrics: Metrics,
    base_dir: Path,
    built: list[object],
    start: bool,
) -> ExtprocPolicies:
    """Build the ``extproc:`` policies (each processor object is appended to ``built``)."""
    policies: dict[str, CompiledExtprocPolicy] = {}
    for policy_name, policy in config.extproc.policies.items():
        compiled: list[CompiledProcessor] = []
        for index, step in enumerate(policy.processors):
            where = f"extproc.policies.{policy_name}.processors[{index}]"
            processor = _build(
                host.processors[step.plugin].factory, validated[(policy_name, index)],
                _context(step.plugin, step.label, policy_name, metrics, base_dir),
                f"{where}: processor {step.plugin!r}",
            )
            phases = declared_phases(processor)
            missing = [p.value for p in phases if not callable(getattr(processor, hook_name(p), None))]
            if missing:
                raise ConfigError(
                    f"{where}: processor {step.plugin!r} built {type(processor).__name__}, "
                    f"which declares {', '.join(missing)} but has no hook for it"
                )
            built.append(processor)
            if start:
                await _start(processor, f"{where}: processor {step.plugin!r}")
            fixed = _fixed_headers(processor, phases, f"{where}: processor {step.plugin!r}")
            compiled.append(
                CompiledProcessor(
                    label=step.label,
                    kind=step.plugin,
                    processor=processor,
                    phases=phases,
                    duration=metrics.hot(
                        metrics.extproc_processor_duration.labels(policy_name, step.label)
                    ),
                    raised=metrics.hot(
                        metrics.extproc_processor_errors.labels(policy_name, step.label, "exception")
                    ),
                    overran=metrics.hot(
                        metrics.extproc_processor_errors.labels(policy_name, step.label, "timeout")
                    ),
                    fixed=fixed,
                )
            )
        policies[policy_name] = CompiledExtprocPolicy(
            policy_name,
            tuple(compiled),
            on_error=policy.on_error,
            error_status=policy.error_status,
            timeout_s=policy.timeout_ms / 1000,
            mode_override=policy.mode_override,
        )
    return ExtprocPolicies(config.extproc, policies, tuple(built))


def _fixed_headers(
    processor: object, phases: frozenset[Phase], where: str
) -> tuple[HeaderChanges | None, ...]:
    """Per phase, the processor's ``fixed_headers`` answer (headers phases it declares only)."""
    ask = getattr(processor, "fixed_headers", None)
    fixed: list[HeaderChanges | None] = []
    for phase in Phase:
        changes = None
        if ask is not None and phase.is_headers and phase in phases:
            try:
                changes = ask(phase)
            except Exception as exc:
                raise ConfigError(f"{where}: fixed_headers({phase.value}) raised {exc!r}") from exc
            if changes is not None and not isinstance(changes, HeaderChanges):
                raise ConfigError(
                    f"{where}: fixed_headers({phase.value}) returned {type(changes).__name__}, "
                    "expected HeaderChanges or None"
                )
        fixed.append(changes)
    return tuple(fixed)


def _context(
    plugin: str, step: str, policy: str, metrics: Metrics, base_dir: Path
) -> PluginContext:
    return PluginContext(
        plugin=plugin,
        policy=policy,
        step=step,
        logger=logging.getLogger(f"extsvc.plugin.{plugin}"),
        metrics=PluginMetrics(metrics, plugin, policy),
        base_dir=base_dir,
    )


def _build(factory: Any, config: BaseModel, ctx: PluginContext, what: str) -> Any:
    try:
        return factory(config, ctx)
    except Exception as exc:  # a plugin's constructor is third-party code
        raise ConfigError(f"{what} failed to build: {exc}") from exc


async def _start(built: object, what: str) -> None:
    if isinstance(built, Startable):
        try:
            await built.start()
        except Exception as exc:  # a plugin's start-up is third-party code
            raise ConfigError(f"{what} failed to start: {exc}") from exc


async def _compile_policy(
    policy_name: str,
    policy: AuthzPolicy,
    validated: Mapping[tuple[str, int], BaseModel],
    host: PluginHost,
    metrics: Metrics,
    base_dir: Path,
    built: list[Authorizer],
    start: bool,
) -> CompiledPolicy:
    steps = []
    identity_headers: set[str] = set()
    for index, step in enumerate(policy.steps):
        where = f"policies.{policy_name}.steps[{index}]"
        authorizer = _build(
            host.authorizers[step.plugin].factory, validated[(policy_name, index)],
            _context(step.plugin, step.label, policy_name, metrics, base_dir),
            f"{where}: plugin {step.plugin!r}",
        )
        if not isinstance(authorizer, Authorizer):
            raise ConfigError(
                f"{where}: plugin {step.plugin!r} built {type(authorizer).__name__}, "
                "which has no async check(request) method"
            )
        built.append(authorizer)
        if isinstance(authorizer, IdentitySource):
            identity_headers.update(authorizer.identity_headers)
        if start:
            await _start(authorizer, f"{where}: plugin {step.plugin!r}")
        steps.append(
            CompiledStep(
                label=step.label,
                kind=step.plugin,
                authorizer=authorizer,
                duration=metrics.hot(metrics.step_duration.labels(policy_name, step.plugin)),
                raised=metrics.hot(metrics.step_errors.labels(policy_name, step.plugin, "exception")),
                overran=metrics.hot(metrics.step_errors.labels(policy_name, step.plugin, "timeout")),
                invalid=metrics.hot(
                    metrics.step_errors.labels(policy_name, step.plugin, "bad-result")
                ),
            )
        )
    return CompiledPolicy(
        name=policy_name,
        steps=tuple(steps),
        combine=policy.combine,
        on_error=policy.on_error,
        default_decision=_reply_decision(policy.default_reply).with_reason("no step decided"),
        error_decision=_reply_decision(policy.error_reply),
        timeout_s=policy.timeout_ms / 1000 if policy.timeout_ms else None,
        counters={
            label: metrics.hot(metrics.authz_decisions.labels(policy_name, label))
            for label in ("allow", "deny", "error")
        },
        identity_headers=frozenset(identity_headers),
    )


async def validate_file(path: Path, host: PluginHost, metrics: Metrics | None = None) -> Runtime:
    """Everything a reload does except serving: used by ``extsvc validate``."""
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    config = parse(text, source=str(path))
    runtime = await compile_config(
        config, host, metrics or Metrics(), base_dir=path.parent, start=False
    )
    if config.ratelimit is not None:  # the server keeps serving past these; validate is strict
        from extsvc.ratelimit.manager import load_domains

        _, problems = await asyncio.to_thread(load_domains, config.ratelimit, path.parent)
        if problems:
            raise ConfigError(problems)
    return runtime
