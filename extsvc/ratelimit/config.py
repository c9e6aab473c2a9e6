"""Rate-limit domain files: what to count and the limits (the ``ratelimit:`` section that points
at them is :mod:`extsvc.config.ratelimit`).

Domain files are envoyproxy/ratelimit's YAML format, unchanged (docs/internals/envoy-behaviour.md §4.4)::

    domain: gateway
    descriptors:
      - key: generic_key
        value: api
        descriptors:
          - key: api_key              # bare key: any value, one counter per value
            rate_limit: {unit: minute, requests_per_unit: 3, name: api}

Two extension fields may appear in ``rate_limit``: ``algorithm`` (``fixed_window``, the default and
ratelimit's own behaviour; ``sliding_window``; ``token_bucket``) and ``burst`` (token bucket only).
Every problem is reported as ``<file>: <field path>: <message>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extsvc import safeyaml
from extsvc.config.ratelimit import RateLimitSection
from extsvc.ratelimit.algorithms import Algorithm

# RateLimitResponse.RateLimit.Unit numbers (rls.proto) and their window lengths in seconds.
UNITS: dict[str, tuple[int, int]] = {
    "second": (1, 1),
    "minute": (2, 60),
    "hour": (3, 3600),
    "day": (4, 86400),
    "week": (7, 604800),
    "month": (5, 2592000),
    "year": (6, 31536000),
}
UNIT_SECONDS: dict[int, int] = dict(UNITS.values())
MAX_UINT32 = 2**32 - 1
#: A token bucket's fill time in µs stays below this, so that its arrival times (now + twice
#: that at most) are exact in the Redis script's doubles (2^53).
MAX_TOLERANCE_US = 2**50


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- domain files: envoyproxy/ratelimit's format --------------------------------------------


class _Replace(_Model):
    name: str = Field(min_length=1)


class _RateLimit(_Model):
    unit: str | None = None
    requests_per_unit: int = Field(0, ge=0, le=MAX_UINT32)
    unlimited: bool = False
    name: str | None = None
    replaces: list[_Replace] | None = None
    # extensions (not in envoyproxy/ratelimit)
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    burst: int | None = Field(None, ge=1, le=MAX_UINT32)

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in UNITS:
            raise ValueError(f"{value!r} is not one of {', '.join(UNITS)} (any case)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _RateLimit:
        if self.unlimited and self.unit is not None:
            raise ValueError("unlimited cannot be combined with unit")
        if not self.unlimited and self.unit is None:
            raise ValueError("unit is required (or unlimited: true)")
        if self.replaces is not None:
            if not self.replaces:
                raise ValueError("replaces must not be empty")
            if self.name is not None and any(r.name == self.name for r in self.replaces):
                raise ValueError(f"replaces: a limit cannot replace itself ({self.name!r})")
        if self.burst is not None and self.algorithm is not Algorithm.TOKEN_BUCKET:
            raise ValueError("burst is only for algorithm: token_bucket")
        if self.algorithm is Algorithm.TOKEN_BUCKET and self.unit is not None and self.requests_per_unit:
            window_us = UNITS[self.unit.lower()][1] * 1_000_000
            refill_us = (self.burst or self.requests_per_unit) * max(1, window_us // self.requests_per_unit)
            if refill_us > MAX_TOLERANCE_US:
                raise ValueError(
                    "burst / requests_per_unit x unit: a bucket that takes over 35 years to fill"
                )
        return self


class _Descriptor(_Model):
    key: str = Field(min_length=1)
    value: str | None = None
    rate_limit: _RateLimit | None = None
    descriptors: list[_Descriptor] | None = None
    shadow_mode: bool = False
    quota_mode: bool = False
    detailed_metric: bool = False
    value_to_metric: bool = False
    share_threshold: bool = False
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _share_needs_wildcard(self) -> _Descriptor:
        if self.share_threshold and (self.value is None or "*" not in self.value):
            raise ValueError("share_threshold needs a wildcard value (containing '*')")
        return self


class _DomainFile(_Model):
    domain: str = Field(min_length=1)
    descriptors: list[_Descriptor] | None = None


# --- compiled form --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Limit:
    """One limit, ready for the request path."""

    requests_per_unit: int
    unit: int  # rls.proto Unit number
    window_s: int
    name: str
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    burst: int = 0
    unlimited: bool = False
    replaces: frozenset[str] = frozenset()
    shadow_mode: bool = False
    quota_mode: bool = False
    detailed_metric: bool = False
    #: the metrics label: the limit's name, else its path in the domain (``k1_v1.k2``)
    label: str = ""


@dataclass(eq=False, slots=True)
class Node:
    """One level of a domain's descriptor tree."""

    path: str = ""  # ``k1_v1.k2`` (config values; the metrics label of a limit here)
    value: str | None = None  # the configured value (a pattern for wildcards)
    limit: Limit | None = None  # None: no limit here (a whitelist when it is the last level)
    share_threshold: bool = False
    value_to_metric: bool = False
    exact: dict[tuple[str, str], Node] = field(default_factory=dict)
    wildcards: list[tuple[str, re.Pattern[str], Node]] = field(default_factory=list)
    bare: dict[str, Node] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    root: Node
    source: str


def _wildcard(pattern: str) -> re.Pattern[str]:
    """``*`` matches any run of characters (trailing, in the middle, or several)."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _format(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        path = ""
        for part in error["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        lines.append(f"{path or '(top level)'}: {error['msg'].removeprefix('Value error, ')}")
    return lines


class DomainFileError(Exception):
    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = [f"{source}: {p}" for p in problems]
        super().__init__("; ".join(self.problems))


def parse_domain(text: str, source: str) -> Domain:
    """One domain file -> :class:`Domain`; :class:`DomainFileError` naming file and field."""
    try:
        data = safeyaml.load(text)  # aliases and nesting bounded, as for the policy file
    except yaml.YAMLError as exc:
        raise DomainFileError(source, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise DomainFileError(source, [f"the top level must be a mapping, got {type(data).__name__}"])
    try:
        model = _DomainFile.model_validate(data)
    except ValidationError as exc:
        raise DomainFileError(source, _format(exc)) from exc
    problems: list[str] = []
    root = Node()
    _build(model.descriptors or [], root, "descriptors", "", problems)
    if problems:
        raise DomainFileError(source, problems)
    return Domain(model.domain, root, source)


def _build(
    descriptors: Sequence[_Descriptor], parent: Node, where: str, path: str, problems: list[str]
) -> None:
    seen: set[tuple[str, str | None]] = set()
    for index, d in enumerate(descriptors):
        here = f"{where}[{index}]"
        ident = (d.key, d.value)
        if ident in seen:
            shown = f"{d.key}_{d.value}" if d.value is not None else d.key
            problems.append(f"{here}.key: duplicate descriptor {shown!r} at this level")
            continue
        seen.add(ident)
        part = f"{d.key}_{d.value}" if d.value else d.key
        node_path = f"{path}.{part}" if path else part
        node = Node(
            path=node_path,
            value=d.value,
            share_threshold=d.share_threshold,
            value_to_metric=d.value_to_metric,
        )
        if d.rate_limit is not None:
            rl = d.rate_limit
            unit, window = UNITS[rl.unit.lower()] if rl.unit else (0, 0)
            node.limit = Limit(
                requests_per_unit=rl.requests_per_unit,
                unit=unit,
                window_s=window,
                name=rl.name or "",
                algorithm=rl.algorithm,
                burst=rl.burst or rl.requests_per_unit,
                unlimited=rl.unlimited,
                replaces=frozenset(r.name for r in rl.replaces or ()),
                shadow_mode=d.shadow_mode,
                quota_mode=d.quota_mode,
                detailed_metric=d.detailed_metric,
                label=rl.name or node_path,
            )
        if not d.value:
            parent.bare[d.key] = node
        elif "*" in d.value:
            parent.wildcards.append((d.key, _wildcard(d.value), node))
        else:
            parent.exact[(d.key, d.value)] = node
        _build(d.descriptors or [], node, f"{here}.descriptors", node_path, problems)


@dataclass(frozen=True, slots=True)
class DomainSet:
    """The domains serving now, plus what went wrong loading the others."""

    domains: Mapping[str, Domain]
    problems: tuple[str, ...] = ()


def merge_domains(parsed: Iterable[Domain]) -> DomainSet:
    """Domains in source order; a domain already defined by an earlier file is rejected."""
    domains: dict[str, Domain] = {}
    problems: list[str] = []
    for domain in parsed:
        first = domains.get(domain.name)
        if first is not None:
            problems.append(
                f"{domain.source}: domain: {domain.name!r} is already defined in {first.source} "
                "(this file is ignored)"
            )
            continue
        domains[domain.name] = domain
    return DomainSet(domains, tuple(problems))


def domain_sources(section: RateLimitSection, base_dir: Path) -> list[Path]:
    """The domain files named by ``section``: ``files`` first, then ``config_dir`` sorted."""
    paths = [p if p.is_absolute() else base_dir / p for p in section.files]
    if section.config_dir is not None:
        directory = section.config_dir if section.config_dir.is_absolute() else base_dir / section.config_dir
        try:
            found = sorted(
                p
                for p in directory.iterdir()
                if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
            )
        except OSError:
            found = []
        paths.extend(p for p in found if p not in paths)
    return paths


def config_dir_of(section: RateLimitSection, base_dir: Path) -> Path | None:
    if section.config_dir is None:
        return None
    return section.config_dir if section.config_dir.is_absolute() else base_dir / section.config_dir


def load_domains(section: RateLimitSection, base_dir: Path) -> tuple[DomainSet, list[str]]:
    """Every domain file once, strictly (``extsvc validate``): the domains and all problems."""
    problems: list[str] = []
    parsed: list[Domain] = []
    directory = config_dir_of(section, base_dir)
    if directory is not None and not directory.is_dir():
        problems.append(f"ratelimit.config_dir: {directory} is not a directory")
    for path in domain_sources(section, base_dir):
        try:
            parsed.append(parse_domain(path.read_text(encoding="utf-8"), str(path)))
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
        except DomainFileError as exc:
            problems.extend(exc.problems)
    merged = merge_domains(parsed)
    return merged, problems + list(merged.problems)
