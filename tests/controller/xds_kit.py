"""Test parts for the ADS server: hand-built xDS resources, a running server, a real Envoy on it,
and a small in-process ADS client (a fake Envoy) for what needs no real one.

Everything is on 127.0.0.1 with free ports; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from prometheus_client import CollectorRegistry

from extsvc.testing.harness import EnvoyProcess, free_port
from extsvc_controller.xds import CDS, EDS, LDS, RDS, SnapshotCache, XdsSnapshot, ads_bootstrap, serve_xds
from extsvc_controller.xds.server import XdsServerSettings

PREFIX = "extsvc_controller_xds"


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _address(port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))


def cluster(name: str = "backend", connect_timeout_s: int = 1) -> cluster_pb2.Cluster:
    """An EDS cluster whose endpoints come over ADS."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = connect_timeout_s
    c.eds_cluster_config.eds_config.CopyFrom(_ads_source())
    return c


def load_assignment(cluster_name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
            endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=_address(p)))
            for p in ports
        ])],
    )


def listener(name: str, port: int, route_name: str = "local_route") -> listener_pb2.Listener:
    """A plain HTTP listener whose routes come over ADS (RDS ``route_name``)."""
    manager = hcm.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm.Rds(config_source=_ads_source(), route_config_name=route_name),
        http_filters=[
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))
        ],
    )
    out = listener_pb2.Listener(
        name=name,
        address=_address(port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_pack(manager)
            )
        ])],
    )
    out.enable_reuse_port.value = False
    return out


def route_config(
    name: str = "local_route",
    cluster_name: str = "backend",
    response_headers: Mapping[str, str] | None = None,
) -> route_pb2.RouteConfiguration:
    """``/`` -> ``cluster_name``, adding ``response_headers`` to every response."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(
            name="all",
            domains=["*"],
            routes=[route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster=cluster_name),
            )],
        )],
        response_headers_to_add=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
            for k, v in (response_headers or {}).items()
        ],
    )


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def snapshot(
    listener_port: int,
    *backend_ports: int,
    listener_name: str = "listener_0",
    headers: Mapping[str, str] | None = None,
    connect_timeout_s: int = 1,
) -> XdsSnapshot:
    """Cluster ``backend`` (EDS) -> ``backend_ports``, a listener on ``listener_port`` routing ``/`` there."""
    return XdsSnapshot({
        CDS: {"backend": cluster(connect_timeout_s=connect_timeout_s)},
        EDS: {"backend": load_assignment("backend", *backend_ports)},
        LDS: {listener_name: listener(listener_name, listener_port)},
        RDS: {"local_route": route_config(response_headers=headers)},
    })


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """One sample of the server's metrics (0 when absent)."""
    return registry.get_sample_value(f"{PREFIX}_{name}", labels) or 0.0


@dataclass
class Ads:
    """A running ADS server over its own cache and registry."""

    cache: SnapshotCache
    registry: CollectorRegistry
    server: grpc.aio.Server
    port: int

    @classmethod
    async def start(cls, settings: XdsServerSettings | None = None) -> Ads:
        cache, registry = SnapshotCache(), CollectorRegistry()
        server, port = await serve_xds(cache, "127.0.0.1:0", registry, settings=settings)
        return cls(cache, registry, server, port)

    async def stop(self) -> None:
        await self.server.stop(0)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.registry, name, **labels)


async def start_envoy(
    ads: Ads, node_id: str, gateway: str, *, delta: bool = False, keepalive_interval_s: int = 30
) -> EnvoyProcess:
    """A real Envoy whose bootstrap is ``ads_bootstrap`` pointing at ``ads``; ready (LIVE) on return."""
    admin = ("127.0.0.1", free_port())
    boot = ads_bootstrap(node_id, gateway, "127.0.0.1", ads.port, admin=admin, delta=delta,
                         keepalive_interval_s=keepalive_interval_s)
    envoy = EnvoyProcess(yaml.safe_dump(boot, sort_keys=False))  # admin first: EnvoyProcess reads its port
    # start() blocks while it polls /ready: in a thread, so this loop keeps serving ADS meanwhile.
    await asyncio.to_thread(envoy.start)
    return envoy


async def stop_envoy(envoy: EnvoyProcess) -> None:
    await asyncio.to_thread(envoy.__exit__, None, None, None)


async def get(url: str) -> httpx.Response | None:
    """A GET through Envoy; None when the connection fails."""
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
        try:
            return await client.get(url)
        except httpx.TransportError:
            return None


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (sync or async) until it is true; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def served_by(url: str, ok: Callable[[httpx.Response], bool]) -> bool:
    response = await get(url)
    return response is not None and ok(response)


def node(node_id: str, gateway: str | None = None, cluster_name: str = "") -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster=cluster_name)
    if gateway is not None:
        n.metadata.fields["gateway"].CopyFrom(struct_pb2.Value(string_value=gateway))
    return n


@dataclass
class FakeEnvoy:
    """An ADS client over grpc.aio: send requests, receive responses with a timeout.

    ``delta`` picks DeltaAggregatedResources. It never ACKs on its own: tests say what it sends.
    """

    port: int
    delta: bool = False
    responses: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _requests: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _channel: grpc.aio.Channel | None = None
    _reader: asyncio.Task[None] | None = None
    _call: Any = None

    async def __aenter__(self) -> FakeEnvoy:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)

        async def requests() -> Any:
            while True:
                item = await self._requests.get()
                if item is None:
                    return
                yield item

        method = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
        self._call = method(requests())
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self.responses.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            self.responses.put_nowait(exc)

    async def __aexit__(self, *exc: object) -> None:
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=2)
        if self._channel is not None:
            await self._channel.close()

    def send(self, **fields: Any) -> None:
        message = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        self._requests.put_nowait(message(**fields))

    async def receive(self, timeout: float = 5.0) -> Any:
        response = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(response, Exception):
            raise response
        return response

    async def nothing(self, within: float = 0.5) -> bool:
        """True when no response arrives within ``within`` seconds."""
        try:
            await asyncio.wait_for(self.responses.get(), within)
        except TimeoutError:
            return True
        return False


def _anys(response: Any) -> list[any_pb2.Any]:
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.resource for r in response.resources]
    return list(response.resources)


def listener_ports(response: Any) -> list[int]:
    """The ports of the Listeners in a SotW or delta response."""
    out = []
    for packed in _anys(response):
        item = listener_pb2.Listener()
        assert packed.Unpack(item)
        out.append(item.address.socket_address.port_value)
    return out


def names(response: Any) -> list[str]:
    """Resource names in a SotW or delta response."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in response.resources]
    out = []
    for packed in _anys(response):
        for cls in (cluster_pb2.Cluster, listener_pb2.Listener, route_pb2.RouteConfiguration):
            if packed.Is(cls.DESCRIPTOR):
                item = cls()
                packed.Unpack(item)
                out.append(item.name)
        if packed.Is(endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR):
            cla = endpoint_pb2.ClusterLoadAssignment()
            packed.Unpack(cla)
            out.append(cla.cluster_name)
    return out


__all__ = [
    "Ads",
    "FakeEnvoy",
    "cluster",
    "free_port",
    "get",
    "listener",
    "listener_ports",
    "load_assignment",
    "metric",
    "names",
    "node",
    "route_config",
    "served_by",
    "snapshot",
    "start_envoy",
    "stop_envoy",
    "until",
]
