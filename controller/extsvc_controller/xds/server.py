"""The ADS servicer: state-of-the-world and delta xDS over grpc.aio, fed by a :class:`SnapshotCache`.

Shape of a stream (why): one reader task turns requests into queue items and the handler is the
only task that writes, because two writers on one grpc.aio stream make one of them fail; snapshot
changes enter the same queue as a single pending "wake", so pushes and answers are serialised and
go out in CDS -> EDS -> LDS -> RDS -> SDS order.

Rules taken from Envoy 1.40's observed behaviour:

* the first request of each type on a stream is answered even if its version equals ours (after a
  controller restart a version can collide); later, a type is sent only when its content changed
  or newly named resources exist, and a NACK is never answered by resending (Envoy would NACK again,
  a thousand times a second): the next push waits for a new snapshot;
* a request whose nonce is not the newest sent for its type is stale and ignored (SotW), or only
  its subscription changes are kept (delta, where they are incremental and would otherwise be lost);
* EDS/RDS/SDS are sent as soon as they are named, never held back for a CDS/LDS ACK, which Envoy
  withholds while clusters warm;
* a node without a group, or whose group has no snapshot, gets nothing (an empty CDS/LDS would
  delete what it serves) until a snapshot exists;
* delta: only changed resources are sent, and names the client holds but the snapshot lacks
  (including those in ``initial_resource_versions`` after a reconnect) go in ``removed_resources``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client import CollectorRegistry

from .cache import (
    CDS,
    EDS,
    PUSH_ORDER,
    SHORT_NAMES,
    WILDCARD_TYPES,
    NodeStatus,
    SnapshotCache,
    XdsSnapshot,
    group_of,
    selection_version,
)
from .metrics import XdsMetrics

__all__ = ["CONTROL_PLANE_ID", "AdsServicer", "XdsServerSettings", "serve_xds", "server_options"]

log = logging.getLogger(__name__)

CONTROL_PLANE_ID = "extsvc-controller"


@dataclass(frozen=True)
class XdsServerSettings:
    """Bounds and keepalive of the ADS server.

    ``keepalive_time_ms``/``ping_timeout_ms``: the server pings each connection and drops it when
    no answer comes, so a frozen or vanished Envoy's stream (and its state) is reaped; without
    ``grpc.http2.ping_timeout_ms`` grpc did not notice a stopped Envoy at all.
    ``min_client_ping_interval_ms``: Envoy's own keepalive pings (see the bootstrap's
    ``connection_keepalive``) must be at least this far apart; ping strikes are off so a faster
    Envoy is never sent GOAWAY (which rebuilds the stream every few seconds).
    """

    max_streams: int = 1000
    max_names_per_type: int = 10_000
    max_error_chars: int = 512
    max_node_id_chars: int = 256
    max_queued_requests: int = 16
    max_receive_message_bytes: int = 4 * 1024 * 1024
    keepalive_time_ms: int = 30_000
    ping_timeout_ms: int = 10_000
    min_client_ping_interval_ms: int = 10_000


def server_options(settings: XdsServerSettings) -> list[tuple[str, int]]:
    """grpc.aio server options for ``settings``."""
    return [
        ("grpc.so_reuseport", 0),  # a second server on the same port is a mistake, not a feature
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.ping_timeout_ms),
        ("grpc.http2.ping_timeout_ms", settings.ping_timeout_ms),
        # An idle ADS stream carries no data for hours: keep pinging it (default stops after 2).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_EOF = object()
_WAKE = object()


class _Stream:
    """What both APIs share: the node, the queue, the single writer, ACK/NACK bookkeeping."""

    api = ""

    def __init__(self, cache: SnapshotCache, metrics: XdsMetrics, settings: XdsServerSettings,
                 context: Any) -> None:
        self._cache = cache
        self._metrics = metrics
        self._settings = settings
        self._context = context
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        # The reader waits for room, so a client that floods requests is slowed, not buffered.
        self._room = asyncio.Semaphore(settings.max_queued_requests)
        self._wake_pending = False
        self._nonces = itertools.count(1)
        self._started = False
        self._said: set[str] = set()
        self._status: NodeStatus | None = None
        self._unwatch: Callable[[], None] | None = None
        self.node_id = ""
        self.group: str | None = None

    async def run(self, requests: Any) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self._queue.get()
                if item is _EOF:
                    return
                if item is _WAKE:
                    self._wake_pending = False
                    snapshot = self._snapshot()
                    if snapshot is not None:
                        for type_url in PUSH_ORDER:
                            await self._push(snapshot, type_url)
                    continue
                self._room.release()
                await self._handle(item)
        finally:
            # The bookkeeping first, with no await before it: when grpc cancels this handler
            # (Envoy went away) the await below is cut short, and a node left attached would
            # stay in the ledger for good.
            reader.cancel()
            if self._unwatch is not None:
                self._unwatch()
            if self._status is not None:
                self._cache.nodes.detach(self.node_id)
            log.debug("xDS %s stream of node %r closed", self.api, self.node_id)
            await asyncio.wait({reader}, timeout=1.0)

    async def _read(self, requests: Any) -> None:
        try:
            async for request in requests:
                await self._room.acquire()
                self._queue.put_nowait(request)
        except Exception as exc:  # noqa: BLE001 (a broken stream just ends; run() cleans up)
            log.debug("xDS %s stream of node %r ended: %r", self.api, self.node_id, exc)
        finally:
            self._queue.put_nowait(_EOF)

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self._queue.put_nowait(_WAKE)

    def _start(self, request: Any) -> None:
        """The node comes from the first request (Envoy may send it only there)."""
        if self._started:
            return
        self._started = True
        node = request.node
        self.node_id = _clip(node.id, self._settings.max_node_id_chars)
        self.group = group_of(node)
        self._status = self._cache.nodes.attach(self.node_id, self.group)
        if self.group is not None:
            self._unwatch = self._cache.watch(self.group, self._wake)
        log.info("xDS %s stream: node %r, group %s", self.api, self.node_id, self.group)

    def _snapshot(self) -> XdsSnapshot | None:
        """The group's snapshot; None (said once per stream and reason) when there is none."""
        if self.group is None:
            self._unknown("no_group", "maps to no group (metadata.gateway or cluster '<ns>/<name>')")
            return None
        snapshot = self._cache.get(self.group)
        if snapshot is None:
            self._unknown("no_snapshot", f"group {self.group} has no snapshot yet")
        return snapshot

    def _unknown(self, reason: str, why: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            self._metrics.unknown_nodes.labels(reason).inc()
            log.warning("xDS node %r %s: it gets no config until there is one", self.node_id, why)

    def _known_type(self, type_url: str) -> bool:
        if type_url in SHORT_NAMES:
            return True
        self._metrics.ignored.labels("unknown_type").inc()
        log.debug("xDS node %r: ignored type URL %r", self.node_id, _clip(type_url, 200))
        return False

    def _ack(self, type_url: str, version: str) -> None:
        short = SHORT_NAMES[type_url]
        self._metrics.acks.labels(short).inc()
        if self._status is not None:
            self._status.acked[short] = version
            self._status.nacked.pop(short, None)

    def _nack(self, type_url: str, version: str, message: str) -> None:
        short = SHORT_NAMES[type_url]
        text = _clip(message, self._settings.max_error_chars)
        self._metrics.nacks.labels(short).inc()
        if self._status is not None:
            self._status.nacked[short] = text
        log.warning(
            "xDS NACK from node %r (group %s) for %s version %s; keeping it until the snapshot "
            "changes: %r", self.node_id, self.group, short, version, text,
        )

    def _ignore(self, reason: str) -> None:
        self._metrics.ignored.labels(reason).inc()

    def _next_nonce(self) -> str:
        return str(next(self._nonces))

    async def _write(self, type_url: str, response: Any) -> None:
        await self._context.write(response)
        self._metrics.responses.labels(SHORT_NAMES[type_url]).inc()

    async def _handle(self, request: Any) -> None:
        raise NotImplementedError

    async def _push(self, snapshot: XdsSnapshot, type_url: str) -> None:
        raise NotImplementedError


@dataclass
class _SotwType:
    names: frozenset[str] = frozenset()  # subscribed (EDS/RDS/SDS); CDS/LDS are always everything
    answered: bool = False
    nonce: str = ""
    version: str = ""
    sent_names: frozenset[str] = frozenset()
    replied: str = ""  # the nonce whose ACK/NACK was counted
    nacked: bool = False  # the last response sent was rejected


class _SotwStream(_Stream):
    """State of the world: every response carries the whole selection of its type."""

    api = "sotw"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._types: dict[str, _SotwType] = {}

    async def _handle(self, request: Any) -> None:
        self._start(request)
        type_url = request.type_url
        if not self._known_type(type_url):
            return
        log.debug("xDS <- %r %s version %r nonce %r names %d%s", self.node_id, SHORT_NAMES[type_url],
                  _clip(request.version_info, 64), _clip(request.response_nonce, 64),
                  len(request.resource_names), " error" if request.HasField("error_detail") else "")
        state = self._types.setdefault(type_url, _SotwType())
        again = False
        if request.response_nonce:
            if request.response_nonce != state.nonce:
                self._ignore("stale")  # a newer response is on its way; its ACK will say more
                return
            if state.replied == state.nonce:
                # A second request on a response already ACKed: Envoy opened a new watch (an updated
                # EDS cluster warms on it and waits 15 s unless it gets its endpoints again).
                again = not state.nacked and not request.HasField("error_detail")
            else:
                state.replied = state.nonce
                state.nacked = request.HasField("error_detail")
                if state.nacked:
                    self._nack(type_url, state.version, request.error_detail.message)
                else:
                    self._ack(type_url, request.version_info)
        if type_url not in WILDCARD_TYPES:
            if len(request.resource_names) > self._settings.max_names_per_type:
                self._ignore("too_many_names")
                return
            state.names = frozenset(request.resource_names)
        snapshot = self._snapshot()
        if snapshot is None:
            return
        selection = self._select(snapshot, type_url, state)
        if selection is not None and (
            again or not state.answered or not selection.keys() <= state.sent_names
        ):
            await self._send(snapshot, type_url, state, selection)

    async def _push(self, snapshot: XdsSnapshot, type_url: str) -> None:
        state = self._types.get(type_url)
        if state is None:
            return  # never requested on this stream
        selection = self._select(snapshot, type_url, state)
        if selection is not None and self._version(snapshot, type_url, selection) != state.version:
            await self._send(snapshot, type_url, state, selection)

    @staticmethod
    def _select(snapshot: XdsSnapshot, type_url: str, state: _SotwType) -> Mapping[str, str] | None:
        """What a response would carry (name -> version); None when there is nothing to send.

        For CDS/LDS that is everything, even nothing at all (the snapshot is the group's complete
        state). A named type with none of its names in the snapshot is not answered: Envoy keeps
        waiting, and an empty response would say nothing anyway.
        """
        versions = snapshot.names(type_url)
        if type_url in WILDCARD_TYPES:
            return versions
        chosen = {name: versions[name] for name in state.names if name in versions}
        return chosen or None

    @staticmethod
    def _version(snapshot: XdsSnapshot, type_url: str, selection: Mapping[str, str]) -> str:
        if type_url in WILDCARD_TYPES:
            return snapshot.type_versions[type_url]
        return selection_version(selection.items())

    async def _send(
        self, snapshot: XdsSnapshot, type_url: str, state: _SotwType, selection: Mapping[str, str]
    ) -> None:
        packed = snapshot.packed.get(type_url, {})
        state.version = self._version(snapshot, type_url, selection)
        state.nonce = self._next_nonce()
        state.sent_names = frozenset(selection)
        state.answered = True
        response = discovery_pb2.DiscoveryResponse(
            version_info=state.version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[packed[name] for name in sorted(selection)],
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID),
        )
        log.debug("xDS -> %r %s version %s nonce %s (%d resources)", self.node_id,
                  SHORT_NAMES[type_url], state.version, state.nonce, len(selection))
        await self._write(type_url, response)


@dataclass
class _DeltaType:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    known: dict[str, str] = field(default_factory=dict)  # what the client holds: name -> version
    answered: bool = False
    nonce: str = ""
    version: str = ""


class _DeltaStream(_Stream):
    """Incremental: per-resource versions, only changes and removals are sent."""

    api = "delta"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._types: dict[str, _DeltaType] = {}

    async def _handle(self, request: Any) -> None:
        self._start(request)
        type_url = request.type_url
        if not self._known_type(type_url):
            return
        log.debug("xDS delta <- %r %s nonce %r +%d -%d initial %d%s", self.node_id, SHORT_NAMES[type_url],
                  _clip(request.response_nonce, 64), len(request.resource_names_subscribe),
                  len(request.resource_names_unsubscribe), len(request.initial_resource_versions),
                  " error" if request.HasField("error_detail") else "")
        cap = self._settings.max_names_per_type
        subscribe = list(request.resource_names_subscribe)
        state = self._types.get(type_url)
        if state is None:
            if len(request.initial_resource_versions) > cap or len(subscribe) > cap:
                self._ignore("too_many_names")
                return
            state = self._types[type_url] = _DeltaType()
            # An empty first subscription to CDS/LDS is Envoy's legacy wildcard; "*" the explicit one.
            state.wildcard = type_url in WILDCARD_TYPES and (not subscribe or "*" in subscribe)
            state.known = dict(request.initial_resource_versions)
        elif len(state.names) + len(subscribe) > cap:
            self._ignore("too_many_names")
            return
        if request.response_nonce:
            if request.response_nonce != state.nonce:
                self._ignore("stale")  # the ACK is superseded, the subscription changes below are not
            elif request.HasField("error_detail"):
                self._nack(type_url, state.version, request.error_detail.message)
            else:
                self._ack(type_url, state.version)
        for name in subscribe:
            if name == "*":
                state.wildcard = True
            else:
                state.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
            else:
                state.names.discard(name)
                state.known.pop(name, None)
        snapshot = self._snapshot()
        if snapshot is not None:
            await self._push(snapshot, type_url)

    async def _push(self, snapshot: XdsSnapshot, type_url: str) -> None:
        """Send what the client lacks or holds in another version, and remove what we do not have.

        Idempotent: ``known`` records what was sent, so calling it again (a NACK, a stale ACK, a
        wake with nothing new) sends nothing.
        """
        state = self._types.get(type_url)
        if state is None:
            return
        versions = snapshot.names(type_url)
        changed = sorted(
            name for name, version in versions.items()
            if (state.wildcard or name in state.names) and state.known.get(name) != version
        )
        removed = sorted(name for name in state.known if name not in versions)
        # The first CDS/LDS request is answered even when empty: Envoy's start-up waits for it.
        if not changed and not removed and (state.answered or not state.wildcard):
            return
        packed = snapshot.packed.get(type_url, {})
        state.nonce = self._next_nonce()
        state.version = snapshot.type_versions[type_url]
        state.answered = True
        rewarm = self._endpoints_to_resend(snapshot, [n for n in changed if n in state.known])
        for name in changed:
            state.known[name] = versions[name]
        for name in removed:
            del state.known[name]
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=state.version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[
                discovery_pb2.Resource(name=name, version=versions[name], resource=packed[name])
                for name in changed
            ],
            removed_resources=removed,
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID),
        )
        log.debug("xDS delta -> %r %s nonce %s: %d changed, %d removed", self.node_id,
                  SHORT_NAMES[type_url], state.nonce, len(changed), len(removed))
        await self._write(type_url, response)
        if rewarm:
            await self._push(snapshot, EDS)

    def _endpoints_to_resend(self, snapshot: XdsSnapshot, updated_clusters: list[str]) -> bool:
        """Forget that the client holds the endpoints of EDS clusters being updated; True if any.

        An updated EDS cluster warms until it gets its ClusterLoadAssignment again, and in delta
        mode Envoy 1.40 does not ask for it (it keeps the subscription): without a resend the CDS
        update waits for the 15 s initial fetch timeout.
        """
        eds = self._types.get(EDS)
        if eds is None or not updated_clusters:
            return False
        clusters = snapshot.resources.get(CDS, {})
        forgot = False
        for name in updated_clusters:
            item: Any = clusters.get(name)
            if item is not None and item.type == cluster_pb2.Cluster.EDS:
                service = item.eds_cluster_config.service_name or name
                forgot = eds.known.pop(service, None) is not None or forgot
        return forgot


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """``envoy.service.discovery.v3.AggregatedDiscoveryService`` over a :class:`SnapshotCache`."""

    def __init__(self, cache: SnapshotCache, metrics: XdsMetrics,
                 settings: XdsServerSettings | None = None) -> None:
        self.cache = cache
        self.metrics = metrics
        self.settings = settings or XdsServerSettings()
        self._open = 0

    @property
    def open_streams(self) -> int:
        return self._open

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await self._serve(_SotwStream(self.cache, self.metrics, self.settings, context),
                          request_iterator, context)

    async def DeltaAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        await self._serve(_DeltaStream(self.cache, self.metrics, self.settings, context),
                          request_iterator, context)

    async def _serve(self, stream: _Stream, requests: Any, context: Any) -> None:
        if self._open >= self.settings.max_streams:
            self.metrics.refused_streams.inc()
            log.warning("xDS stream refused: %d streams open (max_streams)", self._open)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many xDS streams")
        self._open += 1
        gauge = self.metrics.streams.labels(stream.api)
        gauge.inc()
        try:
            await stream.run(requests)
        finally:
            self._open -= 1
            gauge.dec()


async def serve_xds(
    cache: SnapshotCache,
    address: str | tuple[str, int],
    registry: CollectorRegistry,
    *,
    settings: XdsServerSettings | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start an ADS server on ``address`` (``"host:port"`` or ``(host, port)``; port 0 picks a free
    one): (server, port).

    Metrics go to ``registry``; ``credentials`` (``grpc.ssl_server_credentials``) makes it TLS.
    The caller stops it with ``await server.stop(grace)``.
    """
    if not isinstance(address, str):
        host, port_number = address
        address = f"[{host}]:{port_number}" if ":" in host else f"{host}:{port_number}"
    settings = settings or XdsServerSettings()
    servicer = AdsServicer(cache, XdsMetrics.create(registry), settings)
    server = grpc.aio.server(options=server_options(settings))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    log.info("xDS server listening on %s (port %d)", address, port)
    return server, port
