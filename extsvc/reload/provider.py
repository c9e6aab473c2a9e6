"""Where config comes from: a watched file, or the embedded demo config.

A change is parse -> validate -> compile -> atomic swap. Any failure keeps the last good runtime,
is logged with every problem, and counted in ``extsvc_config_reloads_total{result="error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from pathlib import Path

from extsvc.config.build import DEFAULT_START_TIMEOUT_S
from extsvc.errors import ConfigError
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import (
    DEFAULT_MAX_CONFIG_BYTES,
    check_config_size,
    compile_config,
    decode_config,
    gc_paused,
    parse_and_check,
    read_config_file,
)
from extsvc.reload.runtime import Runtime, RuntimeHolder

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "default_config.yaml"
#: problems of a rejected load kept for /status (the log has all of them)
MAX_REPORTED_PROBLEMS = 50
#: names listed in a load's log line and by ``extsvc validate`` (then "... and N more")
MAX_LISTED_NAMES = 10


def summarize_names(what: str, names: Iterable[str]) -> str:
    """``3 policies: a, b, c`` -- at most MAX_LISTED_NAMES names, then ``and N more``."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:MAX_LISTED_NAMES]) or "none"
    if len(ordered) > MAX_LISTED_NAMES:
        shown += f" and {len(ordered) - MAX_LISTED_NAMES} more"
    return f"{len(ordered)} {what}: {shown}"


def embedded_default_config() -> str:
    """The demo config served when no ``--config`` is given."""
    return resources.files("extsvc").joinpath(DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")


def embedded_default_dir() -> Path:
    """Where the demo config's relative paths (its rate-limit domain file) point."""
    return Path(str(resources.files("extsvc")))


class ConfigLoader:
    """Loads config text into the :class:`RuntimeHolder`, keeping the last good one on error."""

    def __init__(
        self,
        holder: RuntimeHolder,
        host: PluginHost,
        metrics: Metrics,
        *,
        on_first_load: Callable[[], Awaitable[None]] | None = None,
        on_load: Callable[[Runtime, Path], Awaitable[None]] | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
    ) -> None:
        self._holder = holder
        self.start_timeout_s = start_timeout_s
        self.max_config_bytes = max_config_bytes
        self._host = host
        self._metrics = metrics
        self._generation = 0
        self._on_first_load = on_first_load
        self._on_load = on_load  # after every good load, before readiness (rate-limit domains)
        self._lock = asyncio.Lock()
        #: the serving config: where from, when loaded (Unix time), how long the load took, and
        #: what its choices mean for unmatched requests (ExtsvcConfig.notes); None before one
        self.serving: dict[str, object] | None = None
        #: the last load that was rejected after the serving one (None: none since)
        self.last_rejected: dict[str, object] | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def reject(self, source: str, problem: str) -> None:
        """Count and log a config that could not even be read."""
        self._rejected(source, [problem])
        log.error("config %s rejected: %s (keeping the last good config)", source, problem)

    def _rejected(self, source: str, problems: list[str]) -> None:
        self._metrics.config_reloads.labels("error").inc()
        self.last_rejected = {
            "source": source,
            "at": time.time(),
            "problems": problems[:MAX_REPORTED_PROBLEMS],
            "problem_count": len(problems),
            "serving_generation": self._generation,
        }

    async def load_text(self, text: str, *, source: str, base_dir: Path) -> bool:
        """Compile ``text`` and swap it in; returns whether it was accepted.

        Parsing and validation run in a thread and compiling hands the event loop a turn every
        few milliseconds, so health checks, the admin listener and requests on the serving
        config keep being answered during a big load. Every plugin ``start()`` is bounded by
        ``start_timeout_s``, so a load always ends.
        """
        async with self._lock:
            began = time.perf_counter()
            try:
                check_config_size(len(text.encode()), self.max_config_bytes, source)
                gc.collect(1)  # the young garbage now (cheap), not frozen with the new config
                with gc_paused():
                    config, checked = await asyncio.to_thread(
                        parse_and_check, text, self._host, source=source
                    )
                    runtime = await compile_config(
                        config, self._host, self._metrics,
                        base_dir=base_dir, generation=self._generation + 1,
                        start_timeout_s=self.start_timeout_s, checked=checked,
                    )
                    # The new runtime lives until the next reload: out of the cyclic GC's reach
                    # (as ExtsvcServer.start does after the first load), or the collections
                    # after the pause would each walk all of it at once -- ~1 s of stalled
                    # event loop per million objects (a 2-step policy is ~150). A retired one is
                    # freed by reference counting: measured, the built-in plugins' compiled
                    # steps leave no reference cycles behind.
                    gc.freeze()
            except ConfigError as exc:
                self._rejected(source, exc.problems)
                kept = (
                    f"keeping generation {self._generation}" if self._holder.current
                    else "no config serving yet"
                )
                log.error(
                    "config %s rejected (%s):\n  %s", source, kept, "\n  ".join(exc.problems)
                )
                return False
            self._generation += 1
            first = self._holder.current is None
            self._holder.swap(runtime)
            now = time.time()
            self._metrics.config_reloads.labels("ok").inc()
            self._metrics.config_generation.set(self._generation)
            self._metrics.config_last_success.set(now)
            notes = config.notes()
            self.serving = {
                "source": source,
                "generation": self._generation,
                "loaded_at": now,
                "load_seconds": round(time.perf_counter() - began, 4),
                "notes": notes,
            }
            self.last_rejected = None
            extproc = runtime.extproc
            log.info(
                "config %s loaded: generation %d in %.0f ms, ext_authz %s; ext_proc %s",
                source, self._generation, (time.perf_counter() - began) * 1000,
                summarize_names("policies", runtime.policies),
                summarize_names("policies", extproc.policies if extproc is not None else ()),
            )
            for note in notes:
                log.warning("config %s: %s", source, note)
            if self._on_load is not None:
                await self._on_load(runtime, base_dir)
            if first and self._on_first_load is not None:
                await self._on_first_load()
            return True


class Poller:
    """The reload layer's one clock: every ``interval_s`` (at once after :meth:`wake`) it runs its
    checks in order -- the config file's (:class:`FileWatcher`), then the rate-limit domain
    files' (:class:`~extsvc.reload.ratelimit.RateLimitReloader`).

    One task for every source of config, so that a reload of one never races a reload of
    another, and shutdown stops them all in one place. A check that fails is logged and tried
    again at the next tick: the poller survives anything a file system does.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._checks: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, name: str, check: Callable[[], Awaitable[object]]) -> None:
        self._checks.append((name, check))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reload-poll")

    def wake(self) -> None:
        """Run the checks now instead of at the next tick (SIGHUP)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            for name, check in self._checks:
                try:
                    await check()
                except Exception:
                    log.exception("reload check %s failed (tried again at the next tick)", name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class FileWatcher:
    """Reloads a config file when its content changes; :meth:`poll` runs at every
    :class:`Poller` tick.

    Polling (default every second) instead of inotify, because Kubernetes updates a mounted
    ConfigMap by swapping a symlink, which inotify on the file itself does not see. ``os.stat``
    follows the symlink; the content hash avoids reloading when only the timestamp changed.
    """

    def __init__(self, path: Path, loader: ConfigLoader) -> None:
        self.path = path
        self._loader = loader
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None

    async def load_now(self) -> bool:
        """Read and load the file now (unless its content did not change)."""
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            self._loader.reject(str(self.path), f"cannot be read: {exc.strerror or exc}")
            return False
        self._stat = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        try:  # at most max_config_bytes + 1 bytes are read
            data = await asyncio.to_thread(
                read_config_file, self.path, self._loader.max_config_bytes
            )
        except ConfigError as exc:
            self._loader.reject(str(self.path), exc.problems[0])
            return False
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:  # same bytes as the config serving now
            return True
        try:
            text = decode_config(data, str(self.path))
        except ConfigError as exc:
            self._loader.reject(str(self.path), exc.problems[0])
            return False
        loaded = await self._loader.load_text(
            text, source=str(self.path), base_dir=self.path.parent
        )
        if loaded:  # a failed load is retried on the next change or SIGHUP, even if unchanged
            self._digest = digest
        return loaded

    def trigger(self) -> None:
        """Read the file at the next poll (SIGHUP), even if its timestamp looks unchanged."""
        self._stat = (-1, -1, -1)

    async def poll(self) -> None:
        """Load the file if its timestamp, size or inode changed since the last look."""
        try:
            stat = os.stat(self.path)
            current: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            current = None
        if current == self._stat:
            return
        self._stat = current
        if current is None:  # reported once per disappearance, not every interval
            self._loader.reject(str(self.path), "the file is gone")
        else:
            await self.load_now()
