"""The rate-limit part of the reload layer: the store, the domain files and the serving limiter,
kept across config reloads.

The config's ``ratelimit:`` section is applied after every good load of that file
(:class:`~extsvc.reload.provider.ConfigLoader` calls :meth:`RateLimitReloader.apply`); the domain
files it names are checked at every tick of the reload layer's one poller
(:class:`~extsvc.reload.provider.Poller`, which also checks the config file) and reloaded one by
one. A file that breaks keeps its last good version serving, a duplicate domain is rejected
naming both files, and the other domains are never affected. The store (and so the counters) is
kept as long as its settings do not change; a replaced store is closed after the requests that use
it had time to finish, and every store still open is closed at shutdown.

A store a plugin provides (``type: plugin``) is built here, by its factory, after the config that
names it was validated and swapped in. If the factory (or the store's ``start()``) fails, the rate
limits keep serving with the previous store and settings (none on the first load: the service
answers UNAVAILABLE), the failure is logged, counted as a config reload error and listed in
:attr:`RateLimitReloader.problems`, and the build is retried at every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extsvc.config.ratelimit import RateLimitSection, StoreSettings, StoreType
from extsvc.errors import ConfigError
from extsvc.ratelimit.config import (
    Domain,
    DomainFileError,
    domain_sources,
    merge_domains,
    parse_domain,
)
from extsvc.ratelimit.limiter import Limiter
from extsvc.ratelimit.store import LimitStore
from extsvc.ratelimit.store.builtin import build_store
from extsvc.ratelimit.store.plugin import build_plugin_store

if TYPE_CHECKING:
    from extsvc.plugin.host import PluginHost

log = logging.getLogger(__name__)

_RETIRE_AFTER_S = 5.0


@dataclass
class _File:
    stamp: tuple[int, int, int] | None
    good: Domain | None  # the last version that loaded
    problems: list[str]


class RateLimitReloader:
    """Owns :attr:`limiter`, the one the rate-limit service reads per request (a
    :class:`~extsvc.ratelimit.service.LimiterSource`).

    :param host: provides the ``type: plugin`` stores (without one, none can be selected).
    """

    def __init__(
        self,
        metrics: Any,
        *,
        clock: Callable[[], float] = time.time,
        host: PluginHost | None = None,
    ) -> None:
        self.limiter: Limiter | None = None
        self._metrics = metrics
        self._host = host
        self._clock = clock
        self._section: RateLimitSection | None = None
        self._base_dir = Path()
        self._store: LimitStore | None = None
        self._files: dict[Path, _File] = {}
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # set at shutdown: retired stores close at once
        #: a section whose store could not be built, retried at every poll, and why it failed
        self._pending: tuple[RateLimitSection, Path] | None = None
        self._store_problems: list[str] = []

    @property
    def domains(self) -> list[str]:
        return sorted(self.limiter.domains.domains) if self.limiter else []

    @property
    def problems(self) -> list[str]:
        """What is wrong now: a store that could not be built, domain files that do not load (the
        previous store and the files' last good versions keep serving)."""
        out = list(self._store_problems)
        out.extend(p for f in self._files.values() for p in f.problems)
        if self.limiter is not None:
            out.extend(self.limiter.domains.problems)
        return out

    async def apply(self, section: RateLimitSection | None, base_dir: Path) -> None:
        """Use a new ``ratelimit:`` section (None: the service answers UNAVAILABLE)."""
        async with self._lock:
            self._pending = None
            await self._apply(section, base_dir)

    async def _apply(self, section: RateLimitSection | None, base_dir: Path) -> bool:
        """Whether ``section`` serves now (False: its store could not be built, see _pending)."""
        if section is None:
            self.limiter = None
            self._section = None
            self._files.clear()
            self._store_problems = []
            self._retire(self._store)
            self._store = None
            return True
        if self._store is None or self._section is None or section.store != self._section.store:
            try:
                store = await self._build_store(section.store, base_dir)
            except ConfigError as exc:
                self._store_failed(section, base_dir, exc)
                return False
            self._retire(self._store)
            self._store = store
            log.info("rate-limit store: %s", store.kind)
        self._store_problems = []
        if self._section is not None and self._base_dir != base_dir:
            self._files.clear()
        self._section, self._base_dir = section, base_dir
        # the serving limiter answers until _reload() swaps in one with the new settings: no gap
        await self._reload(force=True)
        return True

    async def _build_store(self, settings: StoreSettings, base_dir: Path) -> LimitStore:
        if settings.type is StoreType.PLUGIN:
            return await build_plugin_store(settings, self._host, self._metrics, base_dir)
        try:
            return build_store(settings, self._clock)
        except OSError as exc:  # the Redis password_file
            raise ConfigError(f"ratelimit.store: {exc}") from exc

    def _store_failed(self, section: RateLimitSection, base_dir: Path, exc: ConfigError) -> None:
        retry = self._pending is not None
        self._pending = (section, base_dir)
        if retry and exc.problems == self._store_problems:
            return  # the same failure at every poll: reported once
        self._store_problems = exc.problems
        self._metrics.config_reloads.labels("error").inc()
        kept = "the previous store and settings keep serving" if self.limiter is not None \
            else "no rate limits serve until it builds"
        log.error("rate-limit store not built (%s; retried at every poll):\n  %s",
                  kept, "\n  ".join(exc.problems))

    async def reload_now(self) -> bool:
        """Check the domain files now (and retry a store that failed to build); whether anything
        changed. The reload layer's poller calls it at every tick."""
        async with self._lock:
            if self._pending is not None and await self._apply(*self._pending):
                return True
            return await self._reload(force=False)  # the serving section's files, meanwhile

    async def _reload(self, *, force: bool) -> bool:
        section, store = self._section, self._store
        if section is None or store is None:
            return False
        paths = await asyncio.to_thread(domain_sources, section, self._base_dir)
        changed = force or set(paths) != set(self._files)
        files: dict[Path, _File] = {}
        for path in paths:
            files[path] = entry = self._files.get(path) or _File(None, None, [])
            try:
                st = os.stat(path)
                stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                stamp = None
            if stamp == entry.stamp and not force:
                continue
            changed = True
            entry.stamp = stamp
            try:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
                entry.good, entry.problems = parse_domain(text, str(path)), []
                self._metrics.rl_domain_loads.labels("ok").inc()
            except (OSError, UnicodeDecodeError) as exc:
                entry.problems = [f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]
            except DomainFileError as exc:
                entry.problems = exc.problems
            if entry.problems:
                self._metrics.rl_domain_loads.labels("error").inc()
                kept = f"keeping its last good version (domain {entry.good.name!r})" if entry.good \
                    else "it defines no domain until fixed"
                log.error("rate-limit domain file rejected, %s:\n  %s", kept, "\n  ".join(entry.problems))
        self._files = files
        if not changed and self.limiter is not None:
            return False
        merged = merge_domains(f.good for f in files.values() if f.good is not None)
        for problem in merged.problems:
            self._metrics.rl_domain_loads.labels("error").inc()
            log.error("rate-limit domain rejected: %s", problem)
        if self.limiter is not None and self.limiter.section is section and self.limiter.store is store:
            self.limiter = self.limiter.with_domains(merged)
        else:
            self.limiter = Limiter(section, merged, store, self._metrics, clock=self._clock)
        self._metrics.rl_domains.set(len(merged.domains))
        log.info("rate-limit domains serving: %s", ", ".join(sorted(merged.domains)) or "none")
        return True

    def _retire(self, store: LimitStore | None) -> None:
        if store is None:
            return

        async def close_later() -> None:
            with contextlib.suppress(TimeoutError):
                # let requests that picked it up finish; at shutdown they already have
                await asyncio.wait_for(self._closing.wait(), _RETIRE_AFTER_S)
            await _close(store)

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        self._closing.set()
        await asyncio.gather(*self._retiring)
        self.limiter = None
        self._pending = None
        if self._store is not None:
            await _close(self._store)
            self._store = None


async def _close(store: LimitStore) -> None:
    try:
        await store.aclose()
    except Exception:  # a store failing to close (a plugin's, say) must not stop the shutdown
        log.exception("closing the rate-limit store %s failed", store.kind)
