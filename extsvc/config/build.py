"""Building plugins from a config: what every protocol's compile step shares.

Validation messages, the ``unknown ... kind`` hint, the plugin context, and bounded ``start()``.
Below the protocols (authz and extproc compile with it); above the plugin API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ValidationError

from extsvc.errors import ConfigError
from extsvc.observability.metrics import Metrics
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.host import PluginHost

log = logging.getLogger(__name__)


def unknown(what: str, name: str, known: Mapping[str, object], host: PluginHost) -> str:
    """``unknown <what> 'x' (known: ...)``, plus a hint when plugins were installed after start."""
    message = f"unknown {what} {name!r} (known: {', '.join(sorted(known)) or 'none'})"
    added = host.entry_points_added()
    if added:
        message += (
            f"; plugin package(s) installed after start-up: {', '.join(added)}: restart extsvc "
            "to load them"
        )
    return message


#: one plugin block of a config: (where, key, plugin kind name, its raw config)
PluginBlock = tuple[str, tuple[str, int], str, Any]


def validate_blocks(
    blocks: Iterable[PluginBlock],
    kinds: Mapping[str, Any],
    what: str,
    host: PluginHost,
    problems: list[str],
) -> dict[tuple[str, int], BaseModel]:
    """Check each block's kind (one of ``kinds``, else a problem naming ``what``) and validate its
    config with the kind's model; the validated configs by key, every problem appended."""
    validated: dict[tuple[str, int], BaseModel] = {}
    for where, key, plugin, config in blocks:
        kind = kinds.get(plugin)
        if kind is None:
            problems.append(f"{where}.plugin: {unknown(what, plugin, kinds, host)}")
            continue
        try:
            validated[key] = kind.config_model.model_validate(config if config is not None else {})
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, f"{where}.config"))
    return validated


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


#: how long a plugin's ``start()`` may take unless the caller says (setting plugin_start_timeout_s)
DEFAULT_START_TIMEOUT_S = 10.0
#: seconds a cancelled ``start()`` gets to end before it is abandoned (logged, left to itself)
CANCEL_GRACE_S = 1.0
#: compiling hands the event loop a turn at least this often (seconds), so that health checks,
#: /readyz and requests on the serving config are answered during a big load
YIELD_EVERY_S = 0.01

#: start() tasks that ignored their cancellation: kept referenced (asyncio keeps only weak ones)
_abandoned: set[asyncio.Task[Any]] = set()


class Build:
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
            await start_plugin(built, what, self)


def context(
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


def build_plugin(factory: Any, config: BaseModel, ctx: PluginContext, what: str) -> Any:
    try:
        return factory(config, ctx)
    except Exception as exc:  # a plugin's constructor is third-party code
        raise ConfigError(f"{what} failed to build: {exc}") from exc


async def start_plugin(built: object, what: str, build: Build) -> None:
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
