"""Kubernetes mode of ``run``: the client, the watch, the parse cache, the Lease and the status sink.

The watch keeps raw objects; a snapshot parses them into the translator's typed objects. Parsing
2,000 objects takes seconds, so each object's parse is kept until its resourceVersion (or, without
one, its content) changes: an edit costs the parse of one object.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig

from ..results import Invalid, Snapshot, Translation
from ..sources.files import snapshot_from_documents
from .lease import LeaderElector
from .metrics import KubeMetrics
from .status import StatusWriter
from .watch import KubeSource

if TYPE_CHECKING:
    from ..serve import RunConfig, Running


def make_client(config: RunConfig) -> AsyncClient:
    """A client from ``--kubeconfig``, else in-cluster (the service account), else ~/.kube/config."""
    kube = KubeConfig.from_file(config.kubeconfig) if config.kubeconfig else KubeConfig.from_env()
    return AsyncClient(config=kube, field_manager=config.controller_name.replace("/", "-"))


class ParseCache:
    """Raw objects -> a Snapshot, parsing only what changed since the last call."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, str, str], tuple[object, Snapshot]] = {}

    def snapshot(
        self, objects: Iterable[Mapping[str, Any] | tuple[Mapping[str, Any], object]]
    ) -> Snapshot:
        """``objects``: raw objects, each with its stamp (``KubeSource.stamped()``: it changes
        when the object does) or alone (the stamp is then its resourceVersion, or a digest)."""
        kept: dict[tuple[str, str, str], tuple[object, Snapshot]] = {}
        for item in objects:
            raw, stamp = item if isinstance(item, tuple) else (item, None)
            meta = raw.get("metadata") or {}
            key = (str(raw.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if stamp is None:
                stamp = str(meta.get("resourceVersion") or "") or _digest(raw)
            old = self._parsed.get(key)
            kept[key] = old if old is not None and old[0] == stamp else (
                stamp, snapshot_from_documents([dict(raw)])
            )
        self._parsed = kept
        objects_out = tuple(o for _, s in kept.values() for o in s.objects)
        invalid: tuple[Invalid, ...] = tuple(i for _, s in kept.values() for i in s.invalid)
        return Snapshot(objects_out, invalid)


def _digest(raw: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


async def kubernetes_source(
    running: Running, config: RunConfig
) -> tuple[Callable[[], Snapshot], Callable[[Translation], Awaitable[None]], list[Any]]:
    """The snapshot function, the status sink and the tasks to run, for :class:`Running`."""
    client = make_client(config)
    metrics = KubeMetrics(running.registry)

    def changed() -> None:
        if running.controller is not None:
            running.controller.changed()

    source = KubeSource(
        client, on_change=changed, namespaces=config.namespaces or None, metrics=metrics,
        watch_idle_s=config.watch_idle_s,
    )
    running.synced = source.synced
    cache = ParseCache()
    tasks: list[Any] = [source.run()]
    running.stops.append(source.stop)
    leader: Callable[[], bool] = lambda: True  # noqa: E731
    if config.leader_election:
        # A new leader writes every status once (the writer skips what is already right).
        elector = LeaderElector(
            client, namespace=config.lease_namespace, name=config.lease_name,
            identity=config.identity, on_started_leading=changed, metrics=metrics,
        )
        leader = lambda: elector.is_leader  # noqa: E731
        tasks.append(elector.run())
        running.stops.append(elector.stop)
    writer = StatusWriter(
        client, controller_name=config.controller_name, leader=leader, metrics=metrics,
        gateway_classes=config.options.gateway_classes or None,
    )

    async def sink(translation: Translation) -> None:
        await writer.write(translation.statuses, source.objects())

    async def close() -> None:
        await asyncio.sleep(0)
        await client.close()

    running.closers.append(close)
    return lambda: cache.snapshot(source.stamped()), sink, tasks
