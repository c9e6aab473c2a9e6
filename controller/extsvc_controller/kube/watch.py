"""KubeSource: the translator's objects, kept current by list + watch, per kind and namespace.

Per (kind, namespace scope) one loop: list (paged) → replace that scope's objects wholesale → watch
from the list's resourceVersion → on a normal stream end resume from the last resourceVersion seen
(events and bookmarks) → on 410 Gone list again (so deletions that happened while away disappear)
→ on any other failure retry with capped, fully jittered backoff, resuming when possible.

Applying an event is idempotent (servers and kmock replay ADDED on reconnect): an event that
changes nothing does not call ``on_change``. The caller debounces ``on_change`` and reads
:meth:`KubeSource.objects` (plain dicts, the shapes manifests have) to build a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from lightkube import AsyncClient

from .api import ALL_NAMESPACES, Api, Gone, NotServed, status_of
from .backoff import Backoff
from .kinds import KINDS, Kind, identity, prune, resource_version
from .metrics import KubeMetrics

log = logging.getLogger(__name__)

#: seconds between looks for a kind the API server does not serve (a CRD installed later)
NOT_SERVED_RETRY_S = 30.0

Key = tuple[str, str, str]  # kind, namespace, name


class KubeSource:
    """:param namespaces: watch only these namespaces (one list+watch each); None: all namespaces.
    :param on_change: called (synchronously) after every change applied to :meth:`objects`.
    :param max_objects_per_kind: objects over the cap are not kept (counted as dropped).
    :param sleep: injectable for tests, like ``backoff``.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        on_change: Callable[[], None] = lambda: None,
        namespaces: Sequence[str] | None = None,
        kinds: Sequence[Kind] = KINDS,
        metrics: KubeMetrics | None = None,
        backoff: Backoff | None = None,
        max_objects_per_kind: int = 10_000,
        page_size: int = 500,
        max_event_bytes: int = 4 << 20,
        watch_timeout: int = 300,
        watch_idle_s: float = 120.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._api = Api(
            client, page_size=page_size, max_event_bytes=max_event_bytes, watch_timeout=watch_timeout,
            watch_idle_s=watch_idle_s,
        )
        self._on_change = on_change
        self._scopes: tuple[str, ...] = tuple(sorted(set(namespaces))) if namespaces else (ALL_NAMESPACES,)
        self._kinds = tuple(kinds)
        self._order = {k.kind: i for i, k in enumerate(self._kinds)}
        self.metrics = metrics if metrics is not None else KubeMetrics()
        self._backoff = backoff or Backoff()
        self._cap = max_objects_per_kind
        self._sleep = sleep
        self._objects: dict[Key, dict[str, Any]] = {}
        #: per object, a number that moves only when more than its status and resourceVersion
        #: change: what the translator reads (our own status writes must not cost a rebuild)
        self._stamps: dict[Key, int] = {}
        self._stamp = 0
        self._count: dict[str, int] = {k.kind: 0 for k in self._kinds}
        self._listed: set[tuple[str, str]] = set()
        #: (kind, scope) the API server answered 404 for: their CRD is not installed
        self._not_served: set[tuple[str, str]] = set()
        self._stopping = asyncio.Event()
        self.synced = asyncio.Event()
        self.resource_versions: dict[tuple[str, str], str | None] = {}  # last seen, for diagnostics

    # --- reading -------------------------------------------------------------------------------

    def objects(self) -> list[dict[str, Any]]:
        """Every object held, by kind (the ``kinds`` order), then namespace, then name."""
        keys = sorted(self._objects, key=lambda k: (self._order[k[0]], k[1], k[2]))
        return [self._objects[k] for k in keys]

    def stamped(self) -> list[tuple[dict[str, Any], int]]:
        """:meth:`objects` with each one's stamp, which changes only when more than the object's
        status and resourceVersion did (for :class:`~.wiring.ParseCache`)."""
        stamps = self._stamps
        keys = sorted(self._objects, key=lambda k: (self._order[k[0]], k[1], k[2]))
        return [(self._objects[k], stamps[k]) for k in keys]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get((kind, namespace, name))

    def _restamp(self, key: Key, old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
        """Keep ``new`` for ``key``; whether it differs from ``old`` in what is translated."""
        self._objects[key] = new
        if old is not None and not translated_change(old, new):
            return False
        self._stamp += 1
        self._stamps[key] = self._stamp
        return True

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch every kind until :meth:`stop`."""
        self._stopping.clear()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._loop(k, s)) for k in self._kinds for s in self._scopes]
            await self._stopping.wait()
            for t in tasks:
                t.cancel()

    def stop(self) -> None:
        self._stopping.set()

    # --- one kind in one scope -----------------------------------------------------------------

    async def _loop(self, kind: Kind, scope: str) -> None:
        rv: str | None = None
        need_list = True
        attempt = 0
        while True:
            try:
                if need_list:
                    rv = await self._list(kind, scope)
                    need_list = False
                    attempt = 0
                events = 0
                async for ev_rv in self._watch(kind, scope, rv):
                    rv = ev_rv or rv
                    events += 1
                    attempt = 0
                self.metrics.watch_restarts.labels(kind.kind).inc()
                log.debug("%s watch in %s ended; resuming from %s", kind.kind, scope, rv)
                if not events:  # a server that ends every watch at once must not be hammered
                    await self._sleep(self._backoff.delay(attempt))
                    attempt += 1
            except asyncio.CancelledError:
                raise
            except NotServed:
                # The API server does not serve this kind (its CRD is not installed): none of it
                # exists. Said once; the kind counts as listed (empty), so readiness does not
                # wait for it, and it is looked for again now and then.
                if (kind.kind, scope) not in self._not_served:
                    self._not_served.add((kind.kind, scope))
                    log.warning(
                        "%s (%s) is not served by the API server in %s (is its CRD installed?); "
                        "treated as none, looked for again every %.0f s",
                        kind.kind, kind.api_version, scope, NOT_SERVED_RETRY_S,
                    )
                self._listed_now(kind, scope, {})
                need_list = True
                await self._sleep(NOT_SERVED_RETRY_S)
            except Gone:
                # Resuming is impossible: list again at once (what the API expects after a 410).
                log.info("%s watch in %s: resourceVersion %s gone; listing again", kind.kind, scope, rv)
                self.metrics.relists.labels(kind.kind).inc()
                need_list = True
            except Exception as exc:  # noqa: BLE001 (any failure of the API or the network: retry)
                self.metrics.watch_errors.labels(kind.kind).inc()
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.warning(
                    "%s list/watch in %s failed (%s); retrying in %.2fs",
                    kind.kind, scope, type(exc).__name__ + (f": {exc}" if str(exc) else ""), delay,
                )
                await self._sleep(delay)
            finally:
                self.resource_versions[(kind.kind, scope)] = rv

    async def _list(self, kind: Kind, scope: str) -> str | None:
        items: list[dict[str, Any]] = []
        cont: str | None = None
        rv: str | None = None
        while True:
            page, rv, cont = await self._api.list_page(kind, scope, cont)
            items += page
            if cont is None:
                break
        fresh: dict[Key, dict[str, Any]] = {}
        for raw in items:
            obj = prune(kind, raw)
            ident = identity(raw)
            if obj is None or ident is None or not self._in_scope(scope, ident[0]):
                continue
            fresh[(kind.kind, *ident)] = obj
        if (kind.kind, scope) in self._not_served:
            self._not_served.discard((kind.kind, scope))
            log.info("%s is served by the API server in %s now", kind.kind, scope)
        self._listed_now(kind, scope, fresh)
        return rv

    def _listed_now(self, kind: Kind, scope: str, fresh: dict[Key, dict[str, Any]]) -> None:
        changed = self._replace(kind, scope, fresh)
        self._listed.add((kind.kind, scope))
        if len(self._listed) == len(self._kinds) * len(self._scopes):
            self.synced.set()
        if changed:
            self._notify()

    async def _watch(self, kind: Kind, scope: str, rv: str | None) -> AsyncIterator[str | None]:
        """Apply the events of one watch request; yields the resourceVersion after each."""
        async for event in self._api.watch(kind, scope, rv):
            etype, obj = event["type"], event.get("object")
            if etype == "ERROR":
                raise status_of(obj)
            if not isinstance(obj, dict):
                continue
            new_rv = resource_version(obj)
            if etype in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(kind, scope, etype, obj)
            yield new_rv  # BOOKMARK: only the resourceVersion moves

    def _in_scope(self, scope: str, namespace: str) -> bool:
        return scope == ALL_NAMESPACES or namespace == scope

    def _apply(self, kind: Kind, scope: str, etype: str, raw: dict[str, Any]) -> None:
        ident = identity(raw)
        if ident is None or not self._in_scope(scope, ident[0]):
            return
        key = (kind.kind, *ident)
        obj = None if etype == "DELETED" else prune(kind, raw)
        if obj is None:  # deleted, or no longer kept (a Secret whose type changed)
            if self._objects.pop(key, None) is not None:
                del self._stamps[key]
                self._count[kind.kind] -= 1
                self._set_gauge(kind)
                self._notify()
            return
        old = self._objects.get(key)
        if old == obj:
            return  # a replayed ADDED, or a change to something not kept
        if old is None:
            if self._count[kind.kind] >= self._cap:
                self.metrics.objects_dropped.labels(kind.kind, "limit").inc()
                log.warning("%s: over %d objects; %s/%s not kept", kind.kind, self._cap, *ident)
                return
            self._count[kind.kind] += 1
            self._set_gauge(kind)
        if self._restamp(key, old, obj):
            log.debug("%s %s %s/%s", etype, kind.kind, *ident)
            self._notify()

    def _replace(self, kind: Kind, scope: str, fresh: dict[Key, dict[str, Any]]) -> bool:
        """Replace the scope's objects of ``kind`` by a list's; True if anything changed."""
        old = {k: v for k, v in self._objects.items() if k[0] == kind.kind and self._in_scope(scope, k[1])}
        others = self._count[kind.kind] - len(old)
        room = max(0, self._cap - others)
        if len(fresh) > room:
            self.metrics.objects_dropped.labels(kind.kind, "limit").inc(len(fresh) - room)
            log.warning("%s: over %d objects; %d not kept", kind.kind, self._cap, len(fresh) - room)
            fresh = dict(sorted(fresh.items())[:room])
        if old == fresh:
            return False
        for k in old.keys() - fresh.keys():
            del self._objects[k]
            del self._stamps[k]
        changed = old.keys() != fresh.keys()
        for k, obj in fresh.items():
            if old.get(k) != obj:
                changed = self._restamp(k, old.get(k), obj) or changed
        self._count[kind.kind] = others + len(fresh)
        self._set_gauge(kind)
        return changed

    def _set_gauge(self, kind: Kind) -> None:
        self.metrics.objects.labels(kind.kind).set(self._count[kind.kind])

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:  # a broken callback must not stop the watches
            log.exception("on_change failed")


def translated_change(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two versions of an object differ in more than ``status`` and
    ``metadata.resourceVersion``: the translator reads neither, and every status write (ours
    too) moves both."""
    if old.keys() - {"status"} != new.keys() - {"status"}:
        return True
    for field, value in old.items():
        if field not in ("status", "metadata") and value != new[field]:
            return True
    old_meta, new_meta = old.get("metadata"), new.get("metadata")
    if not isinstance(old_meta, dict) or not isinstance(new_meta, dict):
        return old_meta != new_meta
    return ({k: v for k, v in old_meta.items() if k != "resourceVersion"}
            != {k: v for k, v in new_meta.items() if k != "resourceVersion"})
