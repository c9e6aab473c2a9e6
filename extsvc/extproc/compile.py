"""The ext_proc compile step: ``extproc.policies`` -> :class:`ExtprocPolicies`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from extsvc.config.build import (
    DEFAULT_START_TIMEOUT_S,
    Build,
    build_plugin,
    context,
    validate_blocks,
)
from extsvc.config.model import ExtprocPolicy, ExtsvcConfig
from extsvc.errors import ConfigError
from extsvc.extproc.model import HeaderChanges, Phase, declared_phases, hook_name
from extsvc.extproc.pipeline import CompiledExtprocPolicy, CompiledProcessor, ExtprocPolicies
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost


def check_processors(config: ExtsvcConfig, host: PluginHost) -> dict[tuple[str, int], BaseModel]:
    """Validate the ``extproc:`` processors; their configs by ``(policy, index)``."""
    problems: list[str] = []
    validated = collect_processors(config, host, problems)
    if problems:
        raise ConfigError(problems)
    return validated


def collect_processors(
    config: ExtsvcConfig, host: PluginHost, problems: list[str]
) -> dict[tuple[str, int], BaseModel]:
    blocks = (
        (f"extproc.policies.{name}.processors[{index}]", (name, index), step.plugin, step.config)
        for name, policy in config.extproc.policies.items()
        for index, step in enumerate(policy.processors)
    )
    return validate_blocks(blocks, host.processors, "processor kind", host, problems)


async def compile_extproc(
    config: ExtsvcConfig,
    validated: Mapping[tuple[str, int], BaseModel],
    host: PluginHost,
    metrics: Metrics,
    base_dir: Path,
    built: list[object],
    start: bool,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
) -> ExtprocPolicies:
    """Build the ``extproc:`` policies (each processor object is appended to ``built``).

    :raises ConfigError: naming every processor that failed (the others are built regardless).
    """
    build = Build(host, metrics, base_dir, start, start_timeout_s)
    return await compile_policies(config, validated, build, built)


async def compile_policies(
    config: ExtsvcConfig,
    validated: Mapping[tuple[str, int], BaseModel],
    build: Build,
    built: list[object],
) -> ExtprocPolicies:
    policies: dict[str, CompiledExtprocPolicy] = {}
    problems: list[str] = []
    for policy_name, policy in config.extproc.policies.items():
        try:
            policies[policy_name] = await compile_policy(
                policy_name, policy, validated, build, built
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
        await build.pause()
    if problems:
        raise ConfigError(problems)
    return ExtprocPolicies(config.extproc, policies, tuple(built))


async def compile_policy(
    policy_name: str,
    policy: ExtprocPolicy,
    validated: Mapping[tuple[str, int], BaseModel],
    build: Build,
    built: list[object],
) -> CompiledExtprocPolicy:
    metrics = build.metrics
    compiled: list[CompiledProcessor] = []
    for index, step in enumerate(policy.processors):
        where = f"extproc.policies.{policy_name}.processors[{index}]"
        processor = build_plugin(
            build.host.processors[step.plugin].factory, validated[(policy_name, index)],
            context(step.plugin, step.label, policy_name, metrics, build.base_dir),
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
        await build.start_step(processor, f"{where}: processor {step.plugin!r}")
        fixed = fixed_headers(processor, phases, f"{where}: processor {step.plugin!r}")
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
                reads=declared_set(processor, "reads", where, step.plugin),
                whole_bodies=declared_set(processor, "whole_bodies", where, step.plugin),
            )
        )
    return CompiledExtprocPolicy(
        policy_name,
        tuple(compiled),
        on_error=policy.on_error,
        error_status=policy.error_status,
        timeout_s=policy.timeout_ms / 1000,
        mode_override=policy.mode_override,
    )


def fixed_headers(
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


def declared_set(processor: object, attribute: str, where: str, kind: str) -> frozenset[Phase]:
    """A processor's ``reads`` or ``whole_bodies``, as phases (``whole_bodies``: body phases)."""
    try:
        phases = frozenset(Phase(p) for p in getattr(processor, attribute, ()) or ())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: processor {kind!r}: {attribute} must be phases: {exc}") from None
    if attribute == "whole_bodies" and (bad := [p.value for p in phases if not p.is_body]):
        raise ConfigError(f"{where}: processor {kind!r}: whole_bodies lists {', '.join(bad)}, not a body")
    return phases
