"""``extsvc-controller run``: the live control plane.

A source (a watched folder of manifests, or the Kubernetes API) says that something changed;
changes are debounced into one snapshot; the pure translator runs on it (in a thread, so the xDS
streams keep being served); each Gateway's resources become one xDS snapshot, and the ADS server
pushes only the Gateways whose content changed. Statuses go to a sink: a file (folder mode) or the
objects' status subresource (Kubernetes mode, leader only).

A snapshot that fails to build (a bug, not bad input: invalid objects are reported on their own
status and never block the rest) keeps the last good config serving; it is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .memo import BuildMemo
from .publish import split
from .results import Options, Snapshot, Translation
from .sources import files, inotify
from .translate import translate
from .xds.cache import SnapshotCache, XdsSnapshot

log = logging.getLogger(__name__)

#: seconds of quiet after a change before a snapshot is built ...
DEBOUNCE_S = 0.05
#: ... but never later than this after the first change of a burst
MAX_DELAY_S = 1.0
#: builds between two full garbage collections (see Controller._settle_memory)
FULL_GC_EVERY = 50

StatusSink = Callable[[Translation], Awaitable[None]]


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        prefix = "extsvc_controller"
        self.builds = Counter(
            f"{prefix}_snapshot_builds", "snapshots built, by result (ok|error)", ["result"],
            registry=registry,
        )
        self.build_seconds = Histogram(
            f"{prefix}_snapshot_build_seconds", "translate + cut into xDS resources, per snapshot",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10), registry=registry,
        )
        self.objects = Gauge(
            f"{prefix}_objects", "objects in the last snapshot, by kind", ["kind"], registry=registry
        )
        self.invalid = Gauge(
            f"{prefix}_invalid_objects", "objects in the last snapshot that failed validation",
            registry=registry,
        )
        self.gateways_pushed = Counter(
            f"{prefix}_gateway_snapshots_changed",
            "Gateway xDS snapshots whose content changed (and so were pushed)", registry=registry,
        )
        self.source_errors = Counter(
            f"{prefix}_source_errors", "manifest reads that failed (the last good ones kept)",
            registry=registry,
        )
        self.source_wakeups = Counter(
            f"{prefix}_folder_wakeups",
            "folder checks started by a change notice (inotify) rather than the poll interval",
            registry=registry,
        )


class FolderSource:
    """Manifest files and directories, polled: a file added, removed or changed (mtime, size,
    inode) is read again; the others keep their parsed objects, so an edit costs the parse of one
    file, not of every manifest. A read that fails (a file half-written, not YAML) keeps the last
    good snapshot and is logged once per change."""

    def __init__(
        self, paths: Sequence[Path], metrics: ControllerMetrics, interval_s: float = 1.0
    ) -> None:
        self.paths = list(paths)
        self._metrics = metrics
        self._interval = interval_s
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._parsed: dict[Path, files.Manifests] = {}
        self._snapshot: Snapshot | None = None
        self.synced = asyncio.Event()
        self.on_change: Callable[[], None] = lambda: None
        #: wake on inotify events (Linux) as well as every interval_s
        self.use_inotify = True

    def snapshot(self) -> Snapshot:
        return self._snapshot or Snapshot(())

    def check(self) -> bool:
        """Read what changed; whether the snapshot changed."""
        warnings: list[str] = []
        try:
            found = files.manifest_files(self.paths, warnings)
        except files.ManifestError as exc:
            return self._failed(str(exc))
        stamps: dict[Path, tuple[int, int, int]] = {}
        for path in found:
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone between the listing and now: the next look sees it
            stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamps == self._stamps and self._snapshot is not None:
            return False
        parsed: dict[Path, files.Manifests] = {}
        try:
            for path, stamp in stamps.items():
                kept = self._parsed.get(path)
                parsed[path] = kept if kept is not None and self._stamps.get(path) == stamp \
                    else files.read([path])
        except files.ManifestError as exc:
            self._stamps = stamps  # reported once; a fix changes a stamp again
            return self._failed(str(exc))
        self._stamps, self._parsed = stamps, parsed
        for path in parsed:
            for warning in parsed[path].warnings:
                log.warning("%s", warning)
        self._snapshot = Snapshot(
            tuple(o for m in parsed.values() for o in m.snapshot.objects),
            tuple(i for m in parsed.values() for i in m.snapshot.invalid),
        )
        self.synced.set()
        return True

    def _failed(self, problem: str) -> bool:
        self._metrics.source_errors.inc()
        log.error("manifests not read (the last good ones keep serving): %s", problem)
        return False

    async def run(self) -> None:
        """Check now, then whenever inotify says a watched directory changed (Linux), and every
        ``interval_s`` anyway (the only clock where inotify is missing)."""
        wake = asyncio.Event()
        watcher = inotify.open_watcher() if self.use_inotify else None
        loop = asyncio.get_running_loop()
        if watcher is not None:
            def woken() -> None:
                if watcher.drain():
                    wake.set()

            loop.add_reader(watcher.fd, woken)
        try:
            while True:
                wake.clear()  # before the check: a change during it wakes the next one
                if await asyncio.to_thread(self.check):
                    log.debug("manifests changed")
                    self.on_change()
                if watcher is not None:  # new directories too
                    watcher.watch(await asyncio.to_thread(inotify.directories, self.paths))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._interval)
                if wake.is_set():
                    self._metrics.source_wakeups.inc()
        finally:
            if watcher is not None:
                loop.remove_reader(watcher.fd)
                watcher.close()


class Controller:
    """Debounce -> translate -> publish, forever (see the module docstring)."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        options: Options,
        cache: SnapshotCache,
        metrics: ControllerMetrics,
        status_sink: StatusSink | None = None,
        debounce_s: float = DEBOUNCE_S,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        self._snapshot = snapshot
        self.options = dataclasses.replace(options, per_gateway=True, explain=False)
        self.cache = cache
        self._metrics = metrics
        self._sink = status_sink
        self._debounce = debounce_s
        self._max_delay = max_delay_s
        self._changed = asyncio.Event()
        self.built = asyncio.Event()  # set after the first snapshot was published
        self.generation = 0
        #: what one build keeps for the next (unchanged routes are not built again)
        self._memo = BuildMemo()
        self._writer: asyncio.Task[None] | None = None
        self._waiting: Translation | None = None
        self._builds_since_full_gc = 0

    def changed(self) -> None:
        """Something in the source changed (called by the source, on the event loop)."""
        self._changed.set()

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            first = time.monotonic()
            while True:  # wait for quiet, but not forever
                self._changed.clear()
                left = self._max_delay - (time.monotonic() - first)
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), min(self._debounce, left))
                except TimeoutError:
                    break
            self._changed.clear()
            log.debug("building a snapshot")
            await self.build()

    async def build(self) -> bool:
        """Translate the current snapshot and publish it; whether it was built."""
        snapshot = self._snapshot()
        began = time.perf_counter()
        try:
            translation, resources = await asyncio.to_thread(self.translate_snapshot, snapshot)
        except Exception:  # a translator bug must not stop the control plane: keep the last good
            self._metrics.builds.labels("error").inc()
            log.exception("snapshot not built (the last good config keeps serving)")
            return False
        changed = 0
        for group, snap in resources.items():
            if self.cache.set(group, snap):
                changed += 1
        for group in set(self.cache.groups()) - resources.keys():
            self.cache.remove(group)
        self._metrics.gateways_pushed.inc(changed)
        self._metrics.builds.labels("ok").inc()
        self._metrics.build_seconds.observe(time.perf_counter() - began)
        _count(self._metrics, snapshot)
        self.generation += 1
        log.info(
            "snapshot %d: %d objects (%d invalid), %d Gateways, %d changed, in %.0f ms",
            self.generation, len(snapshot.objects), len(snapshot.invalid), len(resources), changed,
            (time.perf_counter() - began) * 1000,
        )
        self.built.set()
        self._settle_memory()
        if self._sink is not None:
            self._statuses_for(translation)
        return True

    def _settle_memory(self) -> None:
        """After a build: freeze what it left for Python's garbage collector (``gc.freeze``), so
        that the collections it runs by itself skip those objects -- a full one over a 1,000-route
        snapshot is a 300 ms pause, which used to land in the middle of a later build or push.
        Builds leave no cyclic garbage (measured), but every FULL_GC_EVERY builds a full
        collection runs anyway, right after a publish. Then freed memory goes back to the
        system (``malloc_trim``)."""
        self._builds_since_full_gc += 1
        if self._builds_since_full_gc >= FULL_GC_EVERY:
            self._builds_since_full_gc = 0
            gc.unfreeze()
            gc.collect()
        gc.freeze()
        _trim()

    def _statuses_for(self, translation: Translation) -> None:
        """Hand the statuses to the sink in a task of their own: writing 2,000 statuses to an API
        server takes seconds, and the next snapshot must not wait for them. While a write runs,
        only the newest translation waits (older ones are superseded)."""
        self._waiting = translation
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_statuses())

    async def _write_statuses(self) -> None:
        assert self._sink is not None
        while self._waiting is not None:
            translation, self._waiting = self._waiting, None
            try:
                await self._sink(translation)
            except Exception:
                log.exception("statuses not written (the next snapshot writes them again)")

    async def aclose(self) -> None:
        """Stop writing statuses (the next leader, or the next start, writes them)."""
        if self._writer is not None:
            await cancel_all([self._writer])

    def translate_snapshot(self, snapshot: Snapshot) -> tuple[Translation, dict[str, XdsSnapshot]]:
        self._memo.next_build()
        translation = translate(snapshot, self.options, self._memo)
        return translation, {
            # the messages are built for the snapshot alone: it keeps them without a copy
            group: XdsSnapshot(res.messages(self._memo.messages), copy_messages=False)
            for group, res in split(translation, self._memo.dicts).items()
        }


def _count(metrics: ControllerMetrics, snapshot: Snapshot) -> None:
    kinds: dict[str, int] = {}
    for obj in snapshot.objects:
        kind = type(obj).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, n in kinds.items():
        metrics.objects.labels(kind).set(n)
    metrics.invalid.set(len(snapshot.invalid))


def status_file_sink(path: Path) -> StatusSink:
    """Folder mode: the statuses, as ``render --status`` writes them, replaced atomically."""
    from .render import statuses_yaml

    async def write(translation: Translation) -> None:
        text = statuses_yaml(translation.statuses)
        tmp = path.with_name(f".{path.name}.tmp")
        await asyncio.to_thread(tmp.write_text, text, "utf-8")
        await asyncio.to_thread(os.replace, tmp, path)

    return write


async def cancel_all(tasks: Iterable[asyncio.Task[None]], timeout_s: float = 5.0) -> None:
    """Cancel ``tasks`` and wait for them, ``timeout_s`` at most: a task that does not end is
    logged and left behind, so that a shutdown always ends."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        log.warning("task %s did not end %.0f s after it was cancelled", task.get_name(), timeout_s)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("task %s ended with %r", task.get_name(), task.exception())


def _load_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim``: hands the memory a build freed back to the system (without it the
    process keeps the high-water mark of every build). None where there is no glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


_TRIM = _load_trim()


def _trim() -> None:
    if _TRIM is not None:
        _TRIM()
