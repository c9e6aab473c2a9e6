"""What each plugin step receives besides its config."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extsvc.observability.metrics import HotCounter, HotHistogram, Metrics


class PluginMetrics:
    """Metrics a plugin may define; every series carries the ``plugin`` and ``policy`` labels.

    ``ctx.metrics.counter("cache_hits", "Tokens served from the cache")`` returns the child of
    ``extsvc_plugin_cache_hits_total{plugin=...,policy=...}``. Call it at construction time, not
    per request. The children are the request-path kind (``inc()`` / ``observe()`` only; the
    counts reach ``/metrics`` at every scrape).
    """

    def __init__(self, metrics: Metrics, plugin: str, policy: str) -> None:
        self._metrics = metrics
        self._labels = (plugin, policy)

    def counter(self, name: str, documentation: str) -> HotCounter:
        metrics = self._metrics
        return metrics.hot(metrics.plugin_counter(name, documentation).labels(*self._labels))  # type: ignore[no-any-return]

    def histogram(self, name: str, documentation: str) -> HotHistogram:
        metrics = self._metrics
        return metrics.hot(metrics.plugin_histogram(name, documentation).labels(*self._labels))  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class PluginContext:
    """Per-step services: a logger ``extsvc.plugin.<kind>``, metrics, a clock, secret files.

    :ivar policy: the policy the step belongs to.
    :ivar step: the step's label (its ``name`` or the plugin kind).
    :ivar clock: monotonic seconds; tests pass a fake one.
    :ivar base_dir: relative file paths in plugin configs resolve against the config file's folder.
    """

    plugin: str
    policy: str
    step: str
    logger: logging.Logger
    metrics: PluginMetrics
    clock: Callable[[], float] = time.monotonic
    base_dir: Path = Path()

    def resolve(self, path: str | Path) -> Path:
        """A path from the plugin's config, relative to the config file's folder."""
        candidate = Path(path)
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def read_secret_file(self, path: str | Path) -> bytes:
        """Read a mounted secret (call at load time, never per request).

        The content is returned, never logged; errors name the file but not its content.
        """
        return self.resolve(path).read_bytes()
