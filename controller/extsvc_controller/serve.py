"""The ``run`` process: a source, the controller loop, the ADS server and the admin listener, started
in order and stopped in reverse on SIGTERM/SIGINT (see :mod:`extsvc_controller.run` for the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from extsvc.deadline import stop_step

from .admin import AdminServer
from .results import Options, Snapshot
from .run import (
    DEBOUNCE_S,
    Controller,
    ControllerMetrics,
    FolderSource,
    StatusSink,
    cancel_all,
    status_file_sink,
)
from .xds.cache import SnapshotCache
from .xds.server import serve_xds

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class XdsServerTls:
    """The ADS server's certificate and key (PEM bytes), and the CA Envoys' client certificates
    must be signed by (None: no client certificate asked for)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def read(cls, cert: Path, key: Path, client_ca: Path | None = None) -> XdsServerTls:
        return cls(cert.read_bytes(), key.read_bytes(), client_ca.read_bytes() if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(slots=True)
class RunConfig:
    """What ``extsvc-controller run`` was told (see its ``--help``)."""

    paths: list[Path] = field(default_factory=list)  # folder mode: manifests, watched
    kubernetes: bool = False  # Kubernetes mode: list + watch the API server
    kubeconfig: Path | None = None
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    options: Options = field(default_factory=Options)
    xds_address: tuple[str, int] = ("0.0.0.0", 18000)  # noqa: S104 (Envoys connect from elsewhere)
    xds_tls: XdsServerTls | None = None
    admin_address: tuple[str, int] = ("0.0.0.0", 9902)  # noqa: S104 (kubelet probes, scrapes)
    status_file: Path | None = None  # folder mode
    poll_interval_s: float = 1.0
    debounce_s: float = DEBOUNCE_S
    controller_name: str = "extsvc.dev/controller"
    leader_election: bool = True
    lease_namespace: str = "default"
    lease_name: str = "extsvc-controller"
    identity: str = ""
    #: Kubernetes mode: seconds a watch may stay silent (no event, no bookmark) before it is
    #: restarted from its resourceVersion (catches connections to a vanished API server)
    watch_idle_s: float = 120.0


class Running:
    """A started control plane (tests drive it directly; :func:`main_async` runs it to a signal)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ControllerMetrics(self.registry)
        self.cache = SnapshotCache()
        self._tasks: list[asyncio.Task[None]] = []  # the source's loops
        self._loop_task: asyncio.Task[None] | None = None  # the controller's
        #: called first at stop, so that loops end on their own (a Lease is released)
        self.stops: list[Callable[[], None]] = []
        #: awaited last at stop (clients)
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self.xds_port = 0
        self.xds_server: Any = None
        self.admin: AdminServer | None = None
        self.controller: Controller | None = None
        #: set once the source has read everything once (folder: the files; Kubernetes: a list
        #: of every kind)
        self.synced = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.synced.is_set() and self.controller is not None and self.controller.built.is_set()

    @property
    def alive(self) -> bool:
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        return all(not t.done() for t in tasks)

    async def start(self) -> None:
        c = self.config
        snapshot, sink, run_source = await self._source()
        self.controller = Controller(
            snapshot, c.options, self.cache, self.metrics, sink, debounce_s=c.debounce_s
        )
        self.xds_server, self.xds_port = await serve_xds(
            self.cache, c.xds_address, self.registry,
            credentials=c.xds_tls.credentials() if c.xds_tls is not None else None,
        )
        self.admin = AdminServer(self.registry, lambda: self.ready, lambda: self.alive)
        await self.admin.start(*c.admin_address)
        self._loop_task = asyncio.create_task(self.controller.run(), name="controller")
        self._tasks.extend(asyncio.create_task(r, name="source") for r in run_source)
        log.info(
            "extsvc-controller: xDS on %s:%d, admin on %s:%d, source %s",
            c.xds_address[0], self.xds_port, c.admin_address[0], self.admin.port,
            "kubernetes" if c.kubernetes else ", ".join(map(str, c.paths)),
        )

    async def _source(self) -> tuple[Callable[[], Snapshot], StatusSink | None, list[Any]]:
        c = self.config
        if c.kubernetes:
            from .kube.wiring import kubernetes_source

            return await kubernetes_source(self, c)
        folder = FolderSource(c.paths, self.metrics, c.poll_interval_s)
        folder.on_change = lambda: self.controller.changed() if self.controller else None
        self.synced = folder.synced
        sink = status_file_sink(c.status_file) if c.status_file is not None else None
        return folder.snapshot, sink, [folder.run()]

    async def stop(self, grace_s: float = 2.0) -> None:
        """Ask the loops to end (a leader releases its Lease), give them ``grace_s``, cancel what
        is left, then close the servers and clients."""
        if self._loop_task is not None:
            await cancel_all([self._loop_task])
        if self.controller is not None:
            await self.controller.aclose()
        for stop in self.stops:
            with contextlib.suppress(Exception):
                stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        await cancel_all(self._tasks)
        # every step bounded: a stop always ends (what does not is logged and left behind)
        if self.xds_server is not None:
            await _bounded("the xDS server", self.xds_server.stop(1.0), 3.0)
        if self.admin is not None:
            await _bounded("the admin listener", self.admin.stop(), 3.0)
        for close in self.closers:
            await _bounded("a client", close(), 3.0)


async def main_async(config: RunConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = Running(config)
    try:
        await running.start()
        await stop.wait()
        log.info("signal received: stopping")
    finally:
        await running.stop()
    return 0


async def _bounded(what: str, step: Awaitable[object], timeout_s: float) -> None:
    """Await one step of the stop for at most ``timeout_s``; then cancel it, log it and go on."""
    await stop_step(what, step, asyncio.get_running_loop().time() + timeout_s, log)
