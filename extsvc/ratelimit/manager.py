"""Owns the rate-limit pieces across config reloads: the store, the domain files, the limiter.

The extsvc config's ``ratelimit:`` section is applied on every good load of that file; the domain
files it names are polled (like the config file) and reloaded one by one. A file that breaks keeps
its last good version serving, a duplicate domain is rejected naming both files, and the other
domains are never affected. The store (and so the counters) is kept as long as its settings do not
change; a replaced store is closed after the requests that use it had time to finish.
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
from typing import Any

from extsvc.ratelimit.config import (
    Domain,
    DomainFileError,
    DomainSet,
    RateLimitSection,
    StoreSettings,
    StoreType,
    config_dir_of,
    domain_sources,
    merge_domains,
    parse_domain,
)
from extsvc.ratelimit.limiter import Limiter
from extsvc.ratelimit.store import LimitStore
from extsvc.ratelimit.store.memory import MemoryStore

log = logging.getLogger(__name__)

_RETIRE_AFTER_S = 5.0


def build_store(settings: StoreSettings, clock: Callable[[], float] = time.time) -> LimitStore:
    if settings.type is StoreType.MEMORY:
        return MemoryStore(clock)
    from extsvc.ratelimit.store.redis import build_redis_store  # only needs redis when used

    return build_redis_store(settings)


@dataclass
class _File:
    stamp: tuple[int, int, int] | None
    good: Domain | None  # the last version that loaded
    problems: list[str]


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


class RateLimitManager:
    def __init__(
        self,
        metrics: Any,
        *,
        reload_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limiter: Limiter | None = None
        self._metrics = metrics
        self._interval = reload_interval_s
        self._clock = clock
        self._section: RateLimitSection | None = None
        self._base_dir = Path()
        self._store: LimitStore | None = None
        self._files: dict[Path, _File] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def domains(self) -> list[str]:
        return sorted(self.limiter.domains.domains) if self.limiter else []

    @property
    def problems(self) -> list[str]:
        """What is wrong with the domain files now (their last good versions keep serving)."""
        out = [p for f in self._files.values() for p in f.problems]
        if self.limiter is not None:
            out.extend(self.limiter.domains.problems)
        return out

    async def apply(self, section: RateLimitSection | None, base_dir: Path) -> None:
        """Use a new ``ratelimit:`` section (None: the service answers UNAVAILABLE)."""
        async with self._lock:
            if section is None:
                self.limiter = None
                self._section = None
                self._files.clear()
                self._retire(self._store)
                self._store = None
                return
            if self._store is None or self._section is None or section.store != self._section.store:
                self._retire(self._store)
                self._store = build_store(section.store, self._clock)
                log.info("rate-limit store: %s", self._store.kind)
            if self._section is not None and self._base_dir != base_dir:
                self._files.clear()
            self._section, self._base_dir = section, base_dir
            self.limiter = None  # rebuilt below with the new settings
            await self._reload(force=True)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="ratelimit-watch")

    async def reload_now(self) -> bool:
        """Check the domain files now; whether anything changed."""
        async with self._lock:
            return await self._reload(force=False)

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

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.reload_now()
            except Exception:  # the watcher must survive anything a file system does
                log.exception("rate-limit domain reload failed")

    def _retire(self, store: LimitStore | None) -> None:
        if store is None:
            return

        async def close_later() -> None:
            await asyncio.sleep(_RETIRE_AFTER_S)  # let requests that picked it up finish
            await store.aclose()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._retiring):
            task.cancel()
        self.limiter = None
        if self._store is not None:
            await self._store.aclose()
            self._store = None
