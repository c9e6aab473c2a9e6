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
from extsvc.observability.metrics import Metrics
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.host import PluginHost
from extsvc.plugin.protocols import Authorizer, Startable

log = logging.getLogger(__name__)


def parse(text: str, *, source: str = "<config>") -> ExtsvcConfig:
    """YAML text -> validated :class:`ExtsvcConfig` (plugin blocks not yet checked)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
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
    """Validate every step's plugin kind and config; all problems are reported at once."""
    problems: list[str] = []
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
    if problems:
        raise ConfigError(problems)
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
    policies: dict[str, CompiledPolicy] = {}
    built: list[Authorizer] = []
    try:
        for policy_name, policy in config.policies.items():
            policies[policy_name] = await _compile_policy(
                policy_name, policy, validated, host, metrics, base_dir, built, start
            )
    except BaseException:
        await Runtime.close_authorizers(built)
        raise
    return Runtime(
        config=config,
        policies=policies,
        authorizers=tuple(built),
        generation=generation,
        metrics=metrics,
    )


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
    for index, step in enumerate(policy.steps):
        where = f"policies.{policy_name}.steps[{index}]"
        kind = host.authorizers[step.plugin]
        ctx = PluginContext(
            plugin=step.plugin,
            policy=policy_name,
            step=step.label,
            logger=logging.getLogger(f"extsvc.plugin.{step.plugin}"),
            metrics=PluginMetrics(metrics, step.plugin, policy_name),
            base_dir=base_dir,
        )
        try:
            authorizer: Any = kind.factory(validated[(policy_name, index)], ctx)
        except Exception as exc:  # a plugin's constructor is third-party code
            raise ConfigError(f"{where}: plugin {step.plugin!r} failed to build: {exc}") from exc
        if not isinstance(authorizer, Authorizer):
            raise ConfigError(
                f"{where}: plugin {step.plugin!r} built {type(authorizer).__name__}, "
                "which has no async check(request) method"
            )
        built.append(authorizer)
        if start and isinstance(authorizer, Startable):
            try:
                await authorizer.start()
            except Exception as exc:  # a plugin's start-up is third-party code
                raise ConfigError(f"{where}: plugin {step.plugin!r} failed to start: {exc}") from exc
        steps.append(
            CompiledStep(
                label=step.label,
                kind=step.plugin,
                authorizer=authorizer,
                duration=metrics.step_duration.labels(policy_name, step.plugin),
                raised=metrics.step_errors.labels(policy_name, step.plugin, "exception"),
                overran=metrics.step_errors.labels(policy_name, step.plugin, "timeout"),
                invalid=metrics.step_errors.labels(policy_name, step.plugin, "bad-result"),
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
            label: metrics.authz_decisions.labels(policy_name, label)
            for label in ("allow", "deny", "error")
        },
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
    return runtime
