"""Where config comes from: a watched file, or the embedded demo config.

A change is parse -> validate -> compile -> atomic swap. Any failure keeps the last good runtime,
is logged with every problem, and counted in ``extsvc_config_reloads_total{result="error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from extsvc.config.compile import compile_config, parse
from extsvc.config.runtime import Runtime, RuntimeHolder
from extsvc.errors import ConfigError
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "default_config.yaml"


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
    ) -> None:
        self._holder = holder
        self._host = host
        self._metrics = metrics
        self._generation = 0
        self._on_first_load = on_first_load
        self._on_load = on_load  # after every good load, before readiness (rate-limit domains)
        self._lock = asyncio.Lock()

    @property
    def generation(self) -> int:
        return self._generation

    def reject(self, source: str, problem: str) -> None:
        """Count and log a config that could not even be read."""
        self._metrics.config_reloads.labels("error").inc()
        log.error("config %s rejected: %s (keeping the last good config)", source, problem)

    async def load_text(self, text: str, *, source: str, base_dir: Path) -> bool:
        """Compile ``text`` and swap it in; returns whether it was accepted."""
        async with self._lock:
            try:
                config = parse(text, source=source)
                runtime = await compile_config(
                    config, self._host, self._metrics,
                    base_dir=base_dir, generation=self._generation + 1,
                )
            except ConfigError as exc:
                self._metrics.config_reloads.labels("error").inc()
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
            self._metrics.config_reloads.labels("ok").inc()
            self._metrics.config_generation.set(self._generation)
            self._metrics.config_last_success.set(time.time())
            log.info(
                "config %s loaded: generation %d, policies: %s",
                source, self._generation, ", ".join(sorted(runtime.policies)) or "none",
            )
            if self._on_load is not None:
                await self._on_load(runtime, base_dir)
            if first and self._on_first_load is not None:
                await self._on_first_load()
            return True


class FileWatcher:
    """Polls a config file and reloads it when its content changes.

    Polling (default every second) instead of inotify, because Kubernetes updates a mounted
    ConfigMap by swapping a symlink, which inotify on the file itself does not see. ``os.stat``
    follows the symlink; the content hash avoids reloading when only the timestamp changed.
    """

    def __init__(self, path: Path, loader: ConfigLoader, interval_s: float = 1.0) -> None:
        self.path = path
        self._loader = loader
        self._interval = interval_s
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def load_now(self) -> bool:
        """Read and load the file now (unless its content did not change)."""
        try:
            stat = os.stat(self.path)
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            self._loader.reject(str(self.path), f"cannot be read: {exc.strerror or exc}")
            return False
        self._stat = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:  # same bytes as the config serving now
            return True
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._loader.reject(str(self.path), f"not UTF-8: {exc}")
            return False
        loaded = await self._loader.load_text(
            text, source=str(self.path), base_dir=self.path.parent
        )
        if loaded:  # a failed load is retried on the next change or SIGHUP, even if unchanged
            self._digest = digest
        return loaded

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watch")

    def trigger(self) -> None:
        """Check the file now (SIGHUP), even if its timestamp looks unchanged."""
        self._stat = (-1, -1, -1)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                stat = os.stat(self.path)
                current: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except OSError:
                current = None
            if current == self._stat:
                continue
            self._stat = current
            if current is None:  # reported once per disappearance, not every interval
                self._loader.reject(str(self.path), "the file is gone")
            else:
                await self.load_now()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
