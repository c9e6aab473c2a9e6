"""The ext_authz compile step: ``policies:`` -> :class:`CompiledPolicy` objects."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from extsvc.authz.pipeline import CompiledPolicy, CompiledStep
from extsvc.config.build import Build, build_plugin, context, validate_blocks
from extsvc.config.model import AuthzPolicy, ExtsvcConfig, Reply
from extsvc.errors import ConfigError
from extsvc.plugin.check import Decision
from extsvc.plugin.host import PluginHost
from extsvc.plugin.protocols import Authorizer


def check_steps(
    config: ExtsvcConfig, host: PluginHost, problems: list[str]
) -> dict[tuple[str, int], BaseModel]:
    blocks = (
        (f"policies.{name}.steps[{index}]", (name, index), step.plugin, step.config)
        for name, policy in config.policies.items()
        for index, step in enumerate(policy.steps)
    )
    return validate_blocks(blocks, host.authorizers, "plugin kind", host, problems)


def reply_decision(reply: Reply) -> Decision:
    return Decision.deny(reply.status, reply.body, reply.headers)


async def compile_policy(
    policy_name: str,
    policy: AuthzPolicy,
    validated: Mapping[tuple[str, int], BaseModel],
    build: Build,
    built: list[Authorizer],
) -> CompiledPolicy:
    metrics = build.metrics
    steps = []
    identity_headers: set[str] = set()
    for index, step in enumerate(policy.steps):
        where = f"policies.{policy_name}.steps[{index}]"
        authorizer = build_plugin(
            build.host.authorizers[step.plugin].factory, validated[(policy_name, index)],
            context(step.plugin, step.label, policy_name, metrics, build.base_dir),
            f"{where}: plugin {step.plugin!r}",
        )
        # The Authorizer and IdentitySource protocols, checked the way isinstance() does for
        # them but without typing's runtime-protocol machinery (~4 µs a check, 10 a policy).
        if getattr(authorizer, "check", None) is None:
            raise ConfigError(
                f"{where}: plugin {step.plugin!r} built {type(authorizer).__name__}, "
                "which has no async check(request) method"
            )
        built.append(authorizer)
        if hasattr(authorizer, "identity_headers"):
            identity_headers.update(authorizer.identity_headers)
        await build.start_step(authorizer, f"{where}: plugin {step.plugin!r}")
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
        default_decision=reply_decision(policy.default_reply).with_reason("no step decided"),
        error_decision=reply_decision(policy.error_reply),
        timeout_s=policy.timeout_ms / 1000 if policy.timeout_ms else None,
        counters={
            label: metrics.hot(metrics.authz_decisions.labels(policy_name, label))
            for label in ("allow", "deny", "error")
        },
        identity_headers=frozenset(identity_headers),
    )
