"""Config -> runtime: parse, validate, compile (the server and ``extsvc validate``).

The orchestration above the protocols: each protocol package compiles its own section
(:mod:`extsvc.authz.compile`, :mod:`extsvc.extproc.compile`; a plugin rate-limit store is
checked here and built by :mod:`extsvc.reload.ratelimit`); this module runs them in order and builds the
:class:`~extsvc.reload.runtime.Runtime` that :mod:`extsvc.reload.provider` swaps in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from extsvc import safeyaml
from extsvc.authz.compile import check_steps, compile_policy
from extsvc.authz.pipeline import CompiledPolicy
from extsvc.config.build import (
    DEFAULT_START_TIMEOUT_S,
    Build,
    PluginBlock,
    format_validation_error,
    unknown,
    validate_blocks,
)
from extsvc.config.model import ExtsvcConfig
from extsvc.config.ratelimit import StoreType
from extsvc.errors import ConfigError
from extsvc.extproc.compile import (
    check_processors,
    collect_processors,
    compile_extproc,
    compile_policies,
)
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.plugin.protocols import Authorizer
from extsvc.reload.runtime import Runtime

__all__ = [
    "DEFAULT_MAX_CONFIG_BYTES",
    "DEFAULT_START_TIMEOUT_S",
    "CheckedConfigs",
    "check_config_size",
    "check_plugins",
    "check_processors",
    "compile_config",
    "compile_extproc",
    "decode_config",
    "format_validation_error",
    "gc_paused",
    "parse",
    "parse_and_check",
    "parse_checked",
    "read_config_file",
    "validate_file",
]

#: the default of setting max_config_bytes: 4 MiB, four times what a Kubernetes ConfigMap can
#: hold (1 MiB), about 14,000 two-step policies, which load in a few seconds of CPU
DEFAULT_MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _load_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = safeyaml.load(text)
    except safeyaml.UnsafeYAMLError as exc:
        raise ConfigError(f"{source}: refused: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        # An empty document is never a deliberate config, but it is what a watcher sees between
        # an editor's truncate and its write: rejecting it keeps the last good config serving.
        raise ConfigError(f"{source}: the config is empty (expected at least one section)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse(text: str, *, source: str = "<config>") -> ExtsvcConfig:
    """YAML text -> validated :class:`ExtsvcConfig` (plugin blocks not yet checked)."""
    try:
        return ExtsvcConfig.model_validate(_load_yaml(text, source))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


#: the validated plugin configs of a config by ``(policy, index)``: ext_authz steps, ext_proc
#: processors (what :func:`compile_config` builds the plugins from)
CheckedConfigs = tuple[dict[tuple[str, int], BaseModel], dict[tuple[str, int], BaseModel]]


def parse_checked(text: str, host: PluginHost, *, source: str = "<config>") -> ExtsvcConfig:
    """:func:`parse` and :func:`check_plugins`, reporting the problems of both in one pass.

    When the file's shape is wrong, the plugin blocks that can still be found in it are checked
    too, so that a bad ``combine`` does not hide a misspelled plugin kind further down.
    """
    return parse_and_check(text, host, source=source)[0]


def parse_and_check(
    text: str, host: PluginHost, *, source: str = "<config>"
) -> tuple[ExtsvcConfig, CheckedConfigs]:
    """:func:`parse_checked`, also returning the validated plugin configs for compile_config.

    Pure computation (no event loop, no I/O beyond what plugin config validators do): the
    server runs it in a thread, so that a big file does not stall the event loop.
    """
    data = _load_yaml(text, source)
    try:
        config = ExtsvcConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc)
        problems.extend(p for p in _raw_plugin_problems(data, host) if p not in problems)
        raise ConfigError(problems) from exc
    return config, _check_all(config, host)


def _raw_plugin_problems(data: Mapping[str, Any], host: PluginHost) -> list[str]:
    """The plugin-block problems of a document whose shape failed validation (best effort)."""

    def blocks(section: Any, prefix: str, key: str) -> Iterator[PluginBlock]:
        for name, policy in section.items() if isinstance(section, Mapping) else ():
            items = policy.get(key) if isinstance(policy, Mapping) else None
            for index, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, Mapping) and isinstance(item.get("plugin"), str):
                    where = f"{prefix}.{name}.{key}[{index}]"
                    yield where, (str(name), index), item["plugin"], item.get("config")

    problems: list[str] = []
    extproc = data.get("extproc")
    processors = extproc.get("policies") if isinstance(extproc, Mapping) else None
    validate_blocks(
        blocks(data.get("policies"), "policies", "steps"), host.authorizers, "plugin kind", host,
        problems,
    )
    validate_blocks(
        blocks(processors, "extproc.policies", "processors"), host.processors, "processor kind",
        host, problems,
    )
    return problems


def check_plugins(config: ExtsvcConfig, host: PluginHost) -> dict[tuple[str, int], BaseModel]:
    """Validate every step's (and ext_proc processor's, and a plugin limit store's) kind and
    config; all problems at once.

    Returns the validated ext_authz step configs by ``(policy, index)``.
    """
    return _check_all(config, host)[0]


def _check_all(config: ExtsvcConfig, host: PluginHost) -> CheckedConfigs:
    problems: list[str] = []
    validated = check_steps(config, host, problems)
    processors = collect_processors(config, host, problems)
    _check_limit_store(config, host, problems)
    if problems:
        raise ConfigError(problems)
    return validated, processors


def _check_limit_store(config: ExtsvcConfig, host: PluginHost, problems: list[str]) -> None:
    """``ratelimit.store`` with ``type: plugin``: a known store, a config its model accepts.

    Checked here, with the rest of the config, so a mistake rejects the whole config (the last
    good one keeps serving); :mod:`extsvc.reload.ratelimit` builds the store once the config serves.
    """
    store = config.ratelimit.store if config.ratelimit is not None else None
    if store is None or store.type is not StoreType.PLUGIN:
        return
    where = "ratelimit.store"
    kind = host.limit_stores.get(store.plugin or "")
    if kind is None:
        problems.append(
            f"{where}.plugin: {unknown('limit store', store.plugin or '', host.limit_stores, host)}"
        )
        return
    try:
        kind.config_model.model_validate(store.config)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, f"{where}.config"))


async def compile_config(
    config: ExtsvcConfig,
    host: PluginHost,
    metrics: Metrics,
    *,
    base_dir: Path = Path(),
    generation: int = 0,
    start: bool = True,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    checked: CheckedConfigs | None = None,
) -> Runtime:
    """Build every policy's steps (and ``start()`` them unless ``start`` is false).

    Every policy is built even after one fails, so that a :class:`ConfigError` names each step
    that failed; then the steps built so far are closed: nothing half-built escapes. Each
    ``start()`` gets ``start_timeout_s``; after one overran, the later steps are built but not
    started (the config is rejected anyway). The event loop gets a turn every YIELD_EVERY_S.

    :param checked: :func:`parse_and_check`'s validated plugin configs (else checked here).
    """
    steps_checked, processors_checked = checked or _check_all(config, host)
    build = Build(host, metrics, base_dir, start, start_timeout_s)
    policies: dict[str, CompiledPolicy] = {}
    built: list[Authorizer] = []
    processors: list[object] = []
    problems: list[str] = []
    try:
        for policy_name, policy in config.policies.items():
            try:
                policies[policy_name] = await compile_policy(
                    policy_name, policy, steps_checked, build, built
                )
            except ConfigError as exc:
                problems.extend(exc.problems)
            await build.pause()
        try:
            extproc = await compile_policies(config, processors_checked, build, processors)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
    except BaseException:
        await Runtime.close_plugins(built)
        await Runtime.close_plugins(processors)
        raise
    return Runtime(
        config=config,
        policies=policies,
        authorizers=tuple(built),
        generation=generation,
        metrics=metrics,
        extproc=extproc,
    )


async def validate_file(
    path: Path,
    host: PluginHost,
    metrics: Metrics | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
) -> Runtime:
    """Everything a reload does except serving, every problem at once: ``extsvc validate``.

    Steps are built (so the files they reference are read) but not started (no network).
    """
    data = await asyncio.to_thread(read_config_file, path, max_bytes)
    text = decode_config(data, str(path))
    with gc_paused():
        config, checked = parse_and_check(text, host, source=str(path))
        problems: list[str] = []
        runtime = None
        try:
            runtime = await compile_config(
                config, host, metrics or Metrics(), base_dir=path.parent, start=False,
                checked=checked,
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if config.ratelimit is not None:  # the server keeps serving past these; validate is strict
        from extsvc.ratelimit.config import load_domains

        _, domain_problems = await asyncio.to_thread(load_domains, config.ratelimit, path.parent)
        problems.extend(domain_problems)
    if problems:
        if runtime is not None:
            await runtime.close()
        raise ConfigError(problems)
    assert runtime is not None
    return runtime


def read_config_file(path: Path, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> bytes:
    """The file's bytes; :class:`ConfigError` when unreadable or bigger than ``max_bytes``.

    Reads at most ``max_bytes + 1`` bytes, so a huge (or endless, like a FIFO) file costs no
    more memory than the cap. Blocking: call it in a thread from the event loop.
    """
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    check_config_size(len(data), max_bytes, str(path))
    return data


def check_config_size(size: int, max_bytes: int, source: str) -> None:
    """:class:`ConfigError` when a config of ``size`` bytes is over ``max_bytes``."""
    if size > max_bytes:
        raise ConfigError(
            f"{source}: bigger than max_config_bytes ({max_bytes:,} bytes): refused, a file this "
            "big would take many seconds of CPU and much memory to load. Split the policies "
            "over several extsvc deployments, or raise EXTSVC_MAX_CONFIG_BYTES if it is meant"
        )


_gc_pauses = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (nested and concurrent uses are counted).

    Parsing and compiling a big config allocates hundreds of thousands of objects, all alive
    until the end; every full collection in between walks all of them again: with the GC on,
    an 18,600-policy file took 2.4 times the CPU (measured by bench/config_load.py).
    """
    global _gc_pauses
    if _gc_pauses == 0 and not gc.isenabled():  # switched off by someone else: leave it so
        yield
        return
    _gc_pauses += 1
    gc.disable()
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0:
            gc.enable()


def decode_config(data: bytes, source: str) -> str:
    """A config file's bytes as text; a clear :class:`ConfigError` when they are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not a text file (byte {exc.start} is not UTF-8); the config is YAML text"
        ) from exc
