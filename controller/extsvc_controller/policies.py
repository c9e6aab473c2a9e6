"""TrafficPolicies: their fields, targeting, filter order, precedence and shallow merge."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from . import envoy, model
from .model import GATEWAY_API, KGATEWAY

# docs/internals/kgateway-translation.md §3.2: stage, relative weight (Before -1, During 0, After +1).
STAGES = {
    "Fault": 0,
    "Cors": 1,
    "Waf": 2,
    "AuthN": 3,
    "AuthZ": 4,
    "RateLimit": 5,
    "Accepted": 6,
    "OutAuth": 7,
    "Route": 8,
}
PREDICATE = {"Before": -1, "During": 0, "After": 1}
# The fields merged per scope, in the order their per-filter config is built.
FIELDS = ("extAuth", "extProc", "rateLimit.local", "rateLimit.global")


@dataclass(frozen=True, slots=True)
class Provider:
    """A GatewayExtension as used by a policy: its HTTP filter and where that sorts."""

    name: str  # the HCM filter name
    kind: str
    sort_key: tuple[int, int, int, str]
    filter: envoy.HttpFilter


@dataclass(slots=True)
class Policy:
    """A TrafficPolicy (or an invalid one that keeps its targeting) during translation."""

    obj_ns: str
    obj_name: str
    weight: int
    created: str
    errors: list[str]
    warnings: list[str]
    spec: model.TrafficPolicySpec | None
    targeting: model.Targeting | model.TrafficPolicySpec
    providers: dict[str, Provider] = field(default_factory=dict)  # field -> provider
    attached: set[tuple[str, str]] = field(default_factory=set)  # gateways (ns, name)
    merged: bool = False
    overridden: bool = False
    _key: tuple[object, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.obj_ns}/{self.obj_name}"

    def memo_key(self) -> tuple[object, ...]:
        """What identifies the policy's part in a built route (see .memo): its spec object,
        name and providers; made once (providers are settled before any route is built)."""
        key = self._key
        if key is None:
            providers = tuple(sorted((k, v.name) for k, v in self.providers.items()))
            key = self._key = (id(self.spec), self.ref, providers)
        return key

    def fields(self) -> dict[str, object]:
        spec = self.spec
        if spec is None:
            return {}
        out: dict[str, object] = {}
        if spec.ext_auth is not None:
            out["extAuth"] = spec.ext_auth
        if spec.ext_proc is not None:
            out["extProc"] = spec.ext_proc
        if spec.rate_limit is not None and spec.rate_limit.local is not None:
            out["rateLimit.local"] = spec.rate_limit.local
        if spec.rate_limit is not None and spec.rate_limit.global_ is not None:
            out["rateLimit.global"] = spec.rate_limit.global_
        return out


def policy_weight(meta: model.Metadata) -> int:
    try:
        return int(meta.annotations.get("kgateway.dev/policy-weight", "0"))
    except ValueError:
        return 0


def matches(policy: Policy, kind: str, ns: str, name: str, labels: Mapping[str, str]) -> list[str | None]:
    """The sectionNames (None = whole object) by which ``policy`` targets this object."""
    if policy.obj_ns != ns:
        return []
    out: list[str | None] = []
    group = GATEWAY_API
    for ref in policy.targeting.target_refs or ():
        if ref.kind == kind and ref.group == group and ref.name == name:
            out.append(ref.section_name)
    for sel in policy.targeting.target_selectors or ():
        if (
            sel.kind == kind
            and sel.group == group
            and all(labels.get(k) == v for k, v in sel.match_labels.items())
        ):
            out.append(sel.section_name)
    return out


def merge(attached: Sequence[tuple[int, Policy]]) -> tuple[dict[str, Policy], list[Policy]]:
    """Shallow merge per field (docs/internals/kgateway-translation.md §3.6).

    :returns: (winner per field, invalid policies among ``attached``).
    """
    ordered = sorted(attached, key=lambda lp: (-lp[0], -lp[1].weight, lp[1].created, lp[1].ref))
    invalid = [p for _, p in ordered if p.errors]
    winners: dict[str, Policy] = {}
    for _, policy in ordered:
        if policy.errors:
            continue
        for name in policy.fields():
            if name in winners:
                if winners[name] is not policy:
                    policy.overridden = True
            else:
                winners[name] = policy
    contributors = {id(p) for p in winners.values()}
    if len(contributors) > 1:
        for p in winners.values():
            p.merged = True
    return winners, invalid


def per_filter(
    winners: Mapping[str, Policy],
) -> tuple[dict[str, envoy.Any], dict[str, list[str]], dict[str, tuple[str, str]]]:
    """typed_per_filter_config for one scope, merge origins, and filter -> (policy, settings)."""
    config: dict[str, envoy.Any] = {}
    origins: dict[str, list[str]] = {}
    explain: dict[str, tuple[str, str]] = {}
    for name in FIELDS:
        policy = winners.get(name)
        if policy is None or policy.spec is None:
            continue
        spec = policy.spec
        origins[name] = [f"{KGATEWAY}/TrafficPolicy/{policy.ref}"]
        if name == "extAuth":
            assert spec.ext_auth is not None
            ctx = spec.ext_auth.context_extensions
            _provider_or_disable(
                config, explain, policy, name, spec.ext_auth.disable is not None,
                envoy.DISABLE_EXT_AUTH, envoy.ext_authz_per_route, spec.ext_auth,
                f"contextExtensions={dict(sorted(ctx.items()))}" if ctx else "",
            )
        elif name == "extProc":
            assert spec.ext_proc is not None
            mode = spec.ext_proc.processing_mode
            _provider_or_disable(
                config, explain, policy, name, spec.ext_proc.disable is not None,
                envoy.DISABLE_EXT_PROC, envoy.ext_proc_per_route, spec.ext_proc,
                f"processingMode={mode.model_dump(by_alias=True)}" if mode else "",
            )
        elif name == "rateLimit.local":
            assert spec.rate_limit is not None and spec.rate_limit.local is not None
            local = spec.rate_limit.local
            config[envoy.LOCAL_RATELIMIT] = envoy.local_ratelimit_per_route(local)
            bucket = local.token_bucket
            explain[envoy.LOCAL_RATELIMIT] = (
                policy.ref,
                "local: {} (disabled)"
                if bucket is None
                else f"{bucket.max_tokens} tokens, +{bucket.tokens_per_fill} every "
                f"{bucket.fill_interval}",
            )
        else:
            assert spec.rate_limit is not None and spec.rate_limit.global_ is not None
            p = policy.providers[name]
            config[p.name] = envoy.ratelimit_per_route(spec.rate_limit.global_)
            explain[p.name] = (
                policy.ref,
                "descriptors="
                + " | ".join(
                    ",".join(
                        e.type
                        + (f"({e.header})" if e.header else "")
                        + (f"({e.generic.key}={e.generic.value})" if e.generic else "")
                        for e in d.entries
                    )
                    for d in spec.rate_limit.global_.descriptors
                ),
            )
    return config, origins, explain


_Section = TypeVar("_Section")


def _provider_or_disable(
    config: dict[str, envoy.Any],
    explain: dict[str, tuple[str, str]],
    policy: Policy,
    field: str,
    disabled: bool,
    disable_filter: str,
    per_route: Callable[[_Section], envoy.Any],
    section: _Section,
    settings: str,
) -> None:
    """extAuth / extProc at one scope: ``disable: {}`` switches the global-disable filter on,
    otherwise the provider's filter gets its per-route config."""
    if disabled:
        config[disable_filter] = envoy.enable()
        explain[disable_filter] = (policy.ref, "disable: {}")
        return
    provider = policy.providers[field].name
    config[provider] = per_route(section)
    explain[provider] = (policy.ref, settings)
