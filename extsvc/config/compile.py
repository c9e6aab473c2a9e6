"""Config -> runtime objects: parse, validate, compile (the server and ``extsvc validate``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import BaseModel, ValidationError

from extsvc import safeyaml
from extsvc.authz.model import Decision
from extsvc.authz.pipeline import CompiledPolicy, CompiledStep
from extsvc.config.model import AuthzPolicy, ExtprocPolicy, ExtsvcConfig, Reply
from extsvc.config.runtime import Runtime
from extsvc.errors import ConfigError
from extsvc.extproc.model import HeaderChanges, Phase, declared_phases, hook_name
from extsvc.extproc.pipeline import CompiledExtprocPolicy, CompiledProcessor, ExtprocPolicies
from extsvc.observability.metrics import Metrics
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.host import PluginHost
from extsvc.plugin.protocols import Authorizer
from extsvc.ratelimit.config import StoreType

log = logging.getLogger(__name__)

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

    def entries(section: Any, key: str) -> list[tuple[str, Any]]:
        if not isinstance(section, Mapping):
            return []
        out = []
        for name, policy in section.items():
            items = policy.get(key) if isinstance(policy, Mapping) else None
            for index, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, Mapping) and isinstance(item.get("plugin"), str):
                    out.append((f"{name}.{key}[{index}]", item))
        return out

    problems: list[str] = []
    extproc = data.get("extproc")
    blocks: list[tuple[str, Any, str, Mapping[str, Any], str]] = [
        ("policies", data.get("policies"), "steps", host.authorizers, "plugin kind"),
        (
            "extproc.policies",
            extproc.get("policies") if isinstance(extproc, Mapping) else None,
            "processors",
            host.processors,
            "processor kind",
        ),
    ]
    for prefix, section, key, kinds, what in blocks:
        for where, item in entries(section, key):
            where = f"{prefix}.{where}"
            kind = kinds.get(item["plugin"])
            if kind is None:
                problems.append(f"{where}.plugin: {_unknown(what, item['plugin'], kinds, host)}")
                continue
            config = item.get("config", {})
            try:
                kind.config_model.model_validate(config if config is not None else {})
            except ValidationError as exc:
                problems.extend(format_validation_error(exc, f"{where}.config"))
    return problems


def _unknown(what: str, name: str, known: Mapping[str, object], host: PluginHost) -> str:
    """``unknown <what> 'x' (known: ...)``, plus a hint when plugins were installed after start."""
    message = f"unknown {what} {name!r} (known: {', '.join(sorted(known)) or 'none'})"
    added = host.entry_points_added()
    if added:
        message += (
            f"; plugin package(s) installed after start-up: {', '.join(added)}: restart extsvc "
            "to load them"
        )
    return message


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
    return _check_all(config, host)[0]


def _check_all(config: ExtsvcConfig, host: PluginHost) -> CheckedConfigs:
    problems: list[str] = []
    validated = _check_steps(config, host, problems)
    processors = _check_processors(config, host, problems)
    _check_limit_store(config, host, problems)
    if problems:
        raise ConfigError(problems)
    return validated, processors


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
                problems.append(
                    f"{where}.plugin: {_unknown('processor kind', step.plugin, host.processors, host)}"
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
        problems.append(
            f"{where}.plugin: {_unknown('limit store', store.plugin or '', host.limit_stores, host)}"
        )
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
                problems.append(
                    f"{where}.plugin: {_unknown('plugin kind', step.plugin, host.authorizers, host)}"
                )
                continue
            try:
                validated[(policy_name, index)] = kind.config_model.model_validate(step.config)
            except ValidationError as exc:
                problems.extend(format_validation_error(exc, f"{where}.config"))
    return validated


def _reply_decision(reply: Reply) -> Decision:
    return Decision.deny(reply.status, reply.body, reply.headers)


#: how long a plugin's ``start()`` may take unless the caller says (setting plugin_start_timeout_s)
DEFAULT_START_TIMEOUT_S = 10.0
#: seconds a cancelled ``start()`` gets to end before it is abandoned (logged, left to itself)
CANCEL_GRACE_S = 1.0
#: compiling hands the event loop a turn at least this often (seconds), so that health checks,
#: /readyz and requests on the serving config are answered during a big load
YIELD_EVERY_S = 0.01

#: start() tasks that ignored their cancellation: kept referenced (asyncio keeps only weak ones)
_abandoned: set[asyncio.Task[Any]] = set()


class _Build:
    """What every step of one compile shares: where to build, whether and how to start."""

    def __init__(
        self, host: PluginHost, metrics: Metrics, base_dir: Path, start: bool, start_timeout_s: float
    ) -> None:
        self.host = host
        self.metrics = metrics
        self.base_dir = base_dir
        self.start = start
        self.start_timeout_s = start_timeout_s
        #: set once a start() overran: the config is rejected, later steps are built, not started
        self.start_overran = False
        self._turn = time.perf_counter()

    async def pause(self) -> None:
        """Let the event loop run if this compile has held it for YIELD_EVERY_S."""
        if time.perf_counter() - self._turn >= YIELD_EVERY_S:
            await asyncio.sleep(0)
            self._turn = time.perf_counter()

    async def start_step(self, built: object, what: str) -> None:
        if self.start and not self.start_overran:
            await _start(built, what, self)


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
    build = _Build(host, metrics, base_dir, start, start_timeout_s)
    policies: dict[str, CompiledPolicy] = {}
    built: list[Authorizer] = []
    processors: list[object] = []
    problems: list[str] = []
    try:
        for policy_name, policy in config.policies.items():
            try:
                policies[policy_name] = await _compile_policy(
                    policy_name, policy, steps_checked, build, built
                )
            except ConfigError as exc:
                problems.extend(exc.problems)
            await build.pause()
        try:
            extproc = await _compile_extproc(config, processors_checked, build, processors)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
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
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
) -> ExtprocPolicies:
    """Build the ``extproc:`` policies (each processor object is appended to ``built``).

    :raises ConfigError: naming every processor that failed (the others are built regardless).
    """
    build = _Build(host, metrics, base_dir, start, start_timeout_s)
    return await _compile_extproc(config, validated, build, built)


async def _compile_extproc(
    config: ExtsvcConfig,
    validated: Mapping[tuple[str, int], BaseModel],
    build: _Build,
    built: list[object],
) -> ExtprocPolicies:
    policies: dict[str, CompiledExtprocPolicy] = {}
    problems: list[str] = []
    for policy_name, policy in config.extproc.policies.items():
        try:
            policies[policy_name] = await _compile_extproc_policy(
                policy_name, policy, validated, build, built
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
        await build.pause()
    if problems:
        raise ConfigError(problems)
    return ExtprocPolicies(config.extproc, policies, tuple(built))


async def _compile_extproc_policy(
    policy_name: str,
    policy: ExtprocPolicy,
    validated: Mapping[tuple[str, int], BaseModel],
    build: _Build,
    built: list[object],
) -> CompiledExtprocPolicy:
    metrics = build.metrics
    compiled: list[CompiledProcessor] = []
    for index, step in enumerate(policy.processors):
        where = f"extproc.policies.{policy_name}.processors[{index}]"
        processor = _build(
            build.host.processors[step.plugin].factory, validated[(policy_name, index)],
            _context(step.plugin, step.label, policy_name, metrics, build.base_dir),
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
    return CompiledExtprocPolicy(
        policy_name,
        tuple(compiled),
        on_error=policy.on_error,
        error_status=policy.error_status,
        timeout_s=policy.timeout_ms / 1000,
        mode_override=policy.mode_override,
    )


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


async def _start(built: object, what: str, build: _Build) -> None:
    """Await ``built.start()`` (when it has one) for at most ``build.start_timeout_s``.

    start() runs as its own task, so that an overrun can be cut off even when the plugin ignores
    its cancellation: it then gets CANCEL_GRACE_S to end and is abandoned (logged) after that;
    the load goes on either way. A cancelled load (SIGTERM during start-up) cancels it too.
    """
    start = getattr(built, "start", None)  # Startable, without typing's slow isinstance
    if start is None:
        return
    timeout = build.start_timeout_s
    try:
        task: asyncio.Future[Any] = asyncio.ensure_future(start())
    except Exception as exc:  # a plugin's start-up is third-party code
        raise ConfigError(f"{what} failed to start: {exc}") from exc
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        await _cancel_start(task, what)
        raise
    if not done:
        build.start_overran = True
        await _cancel_start(task, what)
        raise ConfigError(
            f"{what} did not start within {timeout:g} s (plugin_start_timeout_s); the steps "
            "after it were not started"
        )
    if task.cancelled():
        raise ConfigError(f"{what} failed to start: its start() was cancelled")
    error = task.exception()
    if error is None:
        return
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not the plugin's to eat
        raise error
    raise ConfigError(f"{what} failed to start: {error}") from error


async def _cancel_start(task: asyncio.Future[Any], what: str) -> None:
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    if done:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
        return
    log.error("%s: start() ignored its cancellation for %g s; abandoned", what, CANCEL_GRACE_S)
    abandoned = cast("asyncio.Task[Any]", task)
    _abandoned.add(abandoned)
    abandoned.add_done_callback(_forget)


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()


async def _compile_policy(
    policy_name: str,
    policy: AuthzPolicy,
    validated: Mapping[tuple[str, int], BaseModel],
    build: _Build,
    built: list[Authorizer],
) -> CompiledPolicy:
    metrics = build.metrics
    steps = []
    identity_headers: set[str] = set()
    for index, step in enumerate(policy.steps):
        where = f"policies.{policy_name}.steps[{index}]"
        authorizer = _build(
            build.host.authorizers[step.plugin].factory, validated[(policy_name, index)],
            _context(step.plugin, step.label, policy_name, metrics, build.base_dir),
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
        default_decision=_reply_decision(policy.default_reply).with_reason("no step decided"),
        error_decision=_reply_decision(policy.error_reply),
        timeout_s=policy.timeout_ms / 1000 if policy.timeout_ms else None,
        counters={
            label: metrics.hot(metrics.authz_decisions.labels(policy_name, label))
            for label in ("allow", "deny", "error")
        },
        identity_headers=frozenset(identity_headers),
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
        from extsvc.ratelimit.manager import load_domains

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
