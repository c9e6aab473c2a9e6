"""The ADS server (extsvc_controller.xds): a real Envoy 1.40 fed over SotW and delta ADS, and an
in-process ADS client for the protocol rules a real Envoy does not exercise on demand.

Resources are built by hand as protobuf (tests/controller/xds_kit.py), independent of the
translator. Nothing is timed: behaviour changes are polled for, with a bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (an Any type in the bootstrap)
from google.protobuf import json_format

from extsvc.testing.harness import EchoBackend
from extsvc_controller.xds import (
    CDS,
    EDS,
    LDS,
    RDS,
    SDS,
    SnapshotCache,
    XdsServerSettings,
    XdsSnapshot,
    ads_bootstrap,
    group_of,
)

from .xds_kit import (
    Ads,
    FakeEnvoy,
    cluster,
    free_port,
    get,
    listener_ports,
    load_assignment,
    names,
    node,
    served_by,
    snapshot,
    start_envoy,
    stop_envoy,
    until,
)

GROUP = "demo/gw"


@pytest.fixture
async def ads() -> AsyncIterator[Ads]:
    server = await Ads.start()
    yield server
    await server.stop()


# --- snapshots, groups, bootstrap -------------------------------------------------------------


def test_snapshot_versions_are_content_hashes() -> None:
    one, same = snapshot(10000, 8081), snapshot(10000, 8081)
    assert one.version and one.version == same.version
    assert all(one.type_versions.values())  # never empty, even for a type with no resources
    moved = snapshot(10000, 8082)  # only the endpoints differ
    assert moved.version != one.version
    assert moved.type_versions[EDS] != one.type_versions[EDS]
    assert {t: moved.type_versions[t] for t in (CDS, LDS, RDS)} == {
        t: one.type_versions[t] for t in (CDS, LDS, RDS)
    }
    assert moved.names(CDS) == one.names(CDS)


def test_snapshot_copies_and_checks_its_resources() -> None:
    c = cluster()
    snap = XdsSnapshot({CDS: {"backend": c}})
    before = snap.version
    c.connect_timeout.seconds = 9  # the caller's message, not the snapshot's
    assert XdsSnapshot({CDS: {"backend": snap.resources[CDS]["backend"]}}).version == before
    with pytest.raises(ValueError, match="differs"):
        XdsSnapshot({CDS: {"other": cluster()}})
    with pytest.raises(ValueError, match="ClusterLoadAssignment"):
        XdsSnapshot({CDS: {"backend": load_assignment("backend", 1)}})
    with pytest.raises(ValueError, match="unsupported"):
        XdsSnapshot({"type.googleapis.com/x.Y": {}})


def test_group_of_prefers_metadata_then_cluster() -> None:
    assert group_of(node("n", gateway="ns/gw", cluster_name="other/thing")) == "ns/gw"
    assert group_of(node("n", cluster_name="ns/gw")) == "ns/gw"
    assert group_of(node("n", gateway="not a group", cluster_name="ns/gw")) == "ns/gw"
    assert group_of(node("n", cluster_name="plain")) is None
    assert group_of(node("n", cluster_name="Ns/Gw")) is None  # not Kubernetes names


def test_set_wakes_only_on_changed_content() -> None:
    cache = SnapshotCache()
    woken: list[str] = []
    stop = cache.watch(GROUP, lambda: woken.append("a"))
    cache.watch("other/gw", lambda: woken.append("other"))
    assert cache.set(GROUP, snapshot(1, 2))
    assert not cache.set(GROUP, snapshot(1, 2))  # same content: nobody woken
    assert cache.set(GROUP, snapshot(1, 3))
    assert woken == ["a", "a"]
    stop()
    cache.set(GROUP, snapshot(1, 4))
    cache.remove(GROUP)
    assert woken == ["a", "a"] and cache.get(GROUP) is None


@pytest.mark.parametrize("delta", [False, True])
def test_bootstrap_is_a_valid_envoy_bootstrap(delta: bool) -> None:
    boot = ads_bootstrap("n1", GROUP, "xds.example", 18000, admin=("127.0.0.1", 9901), delta=delta,
                         tls=("/ca.pem", "/cert.pem", "/key.pem"))
    assert next(iter(boot)) == "admin"
    parsed = json_format.ParseDict(boot, bootstrap_pb2.Bootstrap())  # every field name and type is right
    assert parsed.node.cluster == GROUP and parsed.node.metadata.fields["gateway"].string_value == GROUP
    ads_config = parsed.dynamic_resources.ads_config
    assert ads_config.api_type == (ads_config.DELTA_GRPC if delta else ads_config.GRPC)
    assert ads_config.set_node_on_first_message_only
    assert parsed.dynamic_resources.cds_config.HasField("ads")
    xds = parsed.static_resources.clusters[0]
    assert xds.transport_socket.name == "envoy.transport_sockets.tls"
    tls = tls_pb2.UpstreamTlsContext()
    xds.transport_socket.typed_config.Unpack(tls)
    assert tls.sni == "xds.example" and list(tls.common_tls_context.alpn_protocols) == ["h2"]
    assert "tls" not in str(ads_bootstrap("n1", GROUP, "127.0.0.1", 1)["static_resources"])
    with pytest.raises(ValueError, match="namespace"):
        ads_bootstrap("n1", "no-slash", "127.0.0.1", 1)


# --- a real Envoy ---------------------------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_gets_its_config_over_ads_and_serves(ads: Ads, delta: bool) -> None:
    """(a, b) Envoy started from ads_bootstrap alone reaches the backend through the ADS listener."""
    with EchoBackend() as backend:
        port = free_port()
        snap = snapshot(port, backend.port)
        ads.cache.set(GROUP, snap)
        envoy = await start_envoy(ads, "envoy-1", GROUP, delta=delta)
        try:
            response = await get(f"http://127.0.0.1:{port}/hello")
            assert response is not None and response.status_code == 200, response
            assert backend.requests[-1].path == "/hello"
            api = "delta" if delta else "sotw"
            assert ads.metric("streams", api=api) == 1
            status = ads.cache.nodes.get("envoy-1")
            assert status is not None and status.group == GROUP
            await until(lambda: len(status.acked) == 4, "ACKs for cds, eds, lds and rds")
            if not delta:  # SotW ACKs repeat our version_info
                assert status.acked["cds"] == snap.type_versions[CDS]
                assert status.acked["lds"] == snap.type_versions[LDS]
            for short in ("cds", "eds", "lds", "rds"):
                assert ads.metric("responses_total", type=short) == 1, short
            assert ads.metric("nacks_total", type="cds") == 0
        finally:
            await stop_envoy(envoy)
        await until(lambda: ads.metric("streams", api=api) == 0, "the stream to close")
        assert ads.cache.nodes.get("envoy-1") is None  # per-node state goes with its last stream


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_node_leaves_the_ledger_with_its_last_stream_however_it_ends(ads: Ads, delta: bool) -> None:
    """A client that goes away abruptly gets its handler cancelled by grpc; the node's bookkeeping
    is done before any await of the cleanup, so it never stays behind (it did, now and then)."""
    ads.cache.set(GROUP, snapshot(free_port(), free_port()))
    api = "delta" if delta else "sotw"
    for n in range(50):  # the race was lost about once in 40 ends
        async with FakeEnvoy(ads.port, delta=delta) as client:
            client.send(node=node(f"n{n}", GROUP), type_url=CDS)
            await client.receive()
            assert ads.cache.nodes.get(f"n{n}") is not None
        await until(lambda: ads.metric("streams", api=api) == 0, "the stream to close")
        await until(lambda: not ads.cache.nodes.all(), "the node to leave the ledger", timeout=2)


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_changed_snapshot_changes_envoy(ads: Ads, delta: bool) -> None:
    """(c) New endpoints, a new route header and an updated cluster reach Envoy; the updated EDS
    cluster does not stall in warming (its CDS is ACKed long before Envoy's 15 s fetch timeout)."""
    with EchoBackend() as first, EchoBackend() as second:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        ads.cache.set(GROUP, snapshot(port, first.port))
        envoy = await start_envoy(ads, "envoy-1", GROUP, delta=delta)
        try:
            assert await served_by(url, lambda r: r.status_code == 200)
            ads.cache.set(GROUP, snapshot(port, second.port))  # EDS only

            async def on_second() -> bool:
                return await served_by(url, lambda r: r.status_code == 200) and bool(second.requests)

            await until(on_second, "traffic to move to the second backend")
            updated = snapshot(port, second.port, headers={"x-version": "3"}, connect_timeout_s=2)
            ads.cache.set(GROUP, updated)  # CDS (cluster updated) and RDS
            await until(lambda: served_by(url, lambda r: r.headers.get("x-version") == "3"),
                        "the new route header")
            status = ads.cache.nodes.get("envoy-1")
            assert status is not None
            await until(lambda: status.acked.get("cds") == updated.type_versions[CDS], "the CDS ACK",
                        timeout=5.0)
            before = second.requests.copy()
            assert await served_by(url, lambda r: r.status_code == 200)
            assert len(second.requests) == len(before) + 1
        finally:
            await stop_envoy(envoy)


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_nack_is_counted_logged_and_not_resent(
    ads: Ads, delta: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """(d) A cluster Envoy rejects is NACKed once, not re-sent; traffic stays on the previous
    version; the next valid snapshot is ACKed."""
    caplog.set_level(logging.WARNING, logger="extsvc_controller.xds.server")
    with EchoBackend() as backend:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        ads.cache.set(GROUP, snapshot(port, backend.port))
        envoy = await start_envoy(ads, "envoy-1", GROUP, delta=delta)
        try:
            assert await served_by(url, lambda r: r.status_code == 200)
            ads.cache.set(GROUP, snapshot(port, backend.port, connect_timeout_s=-1))
            await until(lambda: ads.metric("nacks_total", type="cds") == 1, "the CDS NACK")
            sent = ads.metric("responses_total", type="cds")
            await asyncio.sleep(1.0)
            assert ads.metric("responses_total", type="cds") == sent  # no NACK loop: nothing re-sent
            assert ads.metric("nacks_total", type="cds") == 1
            assert await served_by(url, lambda r: r.status_code == 200)  # the last good config
            status = ads.cache.nodes.get("envoy-1")
            assert status is not None and status.nacked["cds"]
            assert len(status.nacked["cds"]) <= XdsServerSettings().max_error_chars + 3
            assert any("NACK" in r.getMessage() and "cds" in r.getMessage() for r in caplog.records)

            fixed = snapshot(port, backend.port, connect_timeout_s=2, headers={"x-fixed": "1"})
            ads.cache.set(GROUP, fixed)
            await until(lambda: status.acked.get("cds") == fixed.type_versions[CDS], "the CDS ACK",
                        timeout=5.0)
            assert "cds" not in status.nacked
            await until(lambda: served_by(url, lambda r: r.headers.get("x-fixed") == "1"), "the fix")
        finally:
            await stop_envoy(envoy)


@pytest.mark.envoy
@pytest.mark.slow
async def test_envoy_pings_are_accepted_and_a_frozen_envoy_is_reaped() -> None:
    """Keepalive (docs/internals/envoy-behaviour.md §5.5): Envoy pinging every second is not sent
    GOAWAY (its stream is never rebuilt, so CDS is answered once), and a frozen Envoy's stream is
    closed by the server's pings."""
    ads = await Ads.start(XdsServerSettings(keepalive_time_ms=1000, ping_timeout_ms=1000))
    try:
        with EchoBackend() as backend:
            ads.cache.set(GROUP, snapshot(free_port(), backend.port))
            envoy = await start_envoy(ads, "envoy-1", GROUP, keepalive_interval_s=1)
            try:
                await asyncio.sleep(5.0)  # grpc's defaults sent GOAWAY after 3 pings (~4.5 s)
                assert ads.metric("responses_total", type="cds") == 1
                assert ads.metric("streams", api="sotw") == 1
                envoy.signal(signal.SIGSTOP)
                try:
                    await until(lambda: ads.metric("streams", api="sotw") == 0, "the stream reaped",
                                timeout=8.0)
                    assert ads.cache.nodes.get("envoy-1") is None
                finally:
                    envoy.signal(signal.SIGCONT)
            finally:
                await stop_envoy(envoy)
    finally:
        await ads.stop()


# --- an in-process ADS client -------------------------------------------------------------------


async def test_two_groups_get_their_own_listeners(ads: Ads) -> None:
    """(e) Nodes of two Gateways on two streams each get their group's listener, and a change to one
    group is pushed to its node only."""
    ads.cache.set("ns/a", snapshot(20001, 8081, listener_name="a"))
    ads.cache.set("ns/b", snapshot(20002, 8081, listener_name="b"))
    async with FakeEnvoy(ads.port) as one, FakeEnvoy(ads.port) as two:
        one.send(node=node("one", gateway="ns/a"), type_url=LDS)
        two.send(node=node("two", cluster_name="ns/b"), type_url=LDS)  # group from node.cluster
        got_one, got_two = await one.receive(), await two.receive()
        assert (names(got_one), listener_ports(got_one)) == (["a"], [20001])
        assert (names(got_two), listener_ports(got_two)) == (["b"], [20002])
        assert ads.metric("streams", api="sotw") == 2
        one.send(type_url=LDS, version_info=got_one.version_info, response_nonce=got_one.nonce)
        two.send(type_url=LDS, version_info=got_two.version_info, response_nonce=got_two.nonce)
        await until(lambda: ads.metric("acks_total", type="lds") == 2, "both ACKs")

        ads.cache.set("ns/a", snapshot(20003, 8081, listener_name="a"))
        pushed = await one.receive()
        assert listener_ports(pushed) == [20003] and pushed.nonce != got_one.nonce
        assert await two.nothing(0.3)


async def test_unknown_node_gets_nothing_until_its_snapshot_exists(ads: Ads) -> None:
    """(f) A node without a group, or whose group has no snapshot, gets no (empty) CDS/LDS; once the
    snapshot is set it gets it, CDS first."""
    async with FakeEnvoy(ads.port) as lost, FakeEnvoy(ads.port) as early:
        lost.send(node=node("lost", cluster_name="not-a-gateway"), type_url=CDS)
        lost.send(type_url=LDS)
        early.send(node=node("early", gateway=GROUP), type_url=CDS)
        early.send(type_url=LDS)
        assert await lost.nothing(0.5) and await early.nothing(0.1)
        assert ads.metric("unknown_nodes_total", reason="no_group") == 1  # once per stream
        assert ads.metric("unknown_nodes_total", reason="no_snapshot") == 1

        ads.cache.set(GROUP, snapshot(20001, 8081))
        first, second = await early.receive(), await early.receive()
        assert (first.type_url, names(first)) == (CDS, ["backend"])
        assert (second.type_url, names(second)) == (LDS, ["listener_0"])
        assert await lost.nothing(0.3)


async def test_delta_reconnect_removes_names_the_server_lacks(ads: Ads) -> None:
    """(g) initial_resource_versions naming a resource the server lacks -> removed_resources;
    one held in the current version is not sent again, one in an old version is."""
    snap = snapshot(20001, 8081)
    ads.cache.set(GROUP, snap)
    held = {"backend": snap.names(CDS)["backend"], "ghost": "1"}
    async with FakeEnvoy(ads.port, delta=True) as envoy:
        envoy.send(node=node("n", gateway=GROUP), type_url=CDS, initial_resource_versions=held)
        response = await envoy.receive()
        assert list(response.removed_resources) == ["ghost"] and names(response) == []
        envoy.send(type_url=EDS, resource_names_subscribe=["backend"],
                   initial_resource_versions={"backend": "old"})
        response = await envoy.receive()
        assert names(response) == ["backend"] and list(response.removed_resources) == []
        envoy.send(type_url=EDS, response_nonce=response.nonce)  # ACK: the nonce only
        await until(lambda: ads.metric("acks_total", type="eds") == 1, "the delta ACK")
        assert await envoy.nothing(0.3)


async def test_delta_sends_only_changes_and_removals(ads: Ads) -> None:
    ads.cache.set(GROUP, snapshot(20001, 8081))
    async with FakeEnvoy(ads.port, delta=True) as envoy:
        envoy.send(node=node("n", gateway=GROUP), type_url=CDS)
        assert names(await envoy.receive()) == ["backend"]
        envoy.send(type_url=LDS)
        assert names(await envoy.receive()) == ["listener_0"]
        ads.cache.set(GROUP, snapshot(20002, 8081, listener_name="listener_1"))
        response = await envoy.receive()  # the cluster did not change: LDS only
        assert response.type_url == LDS
        assert names(response) == ["listener_1"] and list(response.removed_resources) == ["listener_0"]
        assert await envoy.nothing(0.3)


def _with_secret(snap: XdsSnapshot, pem: str) -> XdsSnapshot:
    secret = secret_pb2.Secret(name="server_cert")
    secret.tls_certificate.certificate_chain.inline_string = pem
    return XdsSnapshot({**snap.resources, SDS: {"server_cert": secret}})


async def test_sotw_answers_first_requests_ignores_stale_nonces_and_pushes_in_order(ads: Ads) -> None:
    snap = _with_secret(snapshot(20001, 8081), "one")
    ads.cache.set(GROUP, snap)
    async with FakeEnvoy(ads.port) as envoy:
        # A reconnecting Envoy already holding our version is still answered.
        envoy.send(node=node("n", gateway=GROUP), type_url=CDS, version_info=snap.type_versions[CDS])
        cds = await envoy.receive()
        assert cds.version_info == snap.type_versions[CDS]
        envoy.send(type_url=EDS, resource_names=["backend"])  # named: sent before any CDS ACK
        eds = await envoy.receive()
        assert names(eds) == ["backend"]
        envoy.send(type_url=LDS)
        lds = await envoy.receive()
        envoy.send(type_url=RDS, resource_names=["local_route"])
        await envoy.receive()
        envoy.send(type_url=SDS, resource_names=["server_cert"])
        assert (await envoy.receive()).type_url == SDS
        envoy.send(type_url=CDS, version_info=cds.version_info, response_nonce="not-ours")
        assert await envoy.nothing(0.3)
        assert ads.metric("ignored_requests_total", reason="stale") == 1

        changed = snapshot(20002, 8082, headers={"x": "y"}, connect_timeout_s=3)
        ads.cache.set(GROUP, _with_secret(changed, "two"))
        pushed = [(await envoy.receive()).type_url for _ in range(5)]
        assert pushed == [CDS, EDS, LDS, RDS, SDS]  # make before break
        envoy.send(type_url=LDS, version_info=lds.version_info, response_nonce=lds.nonce)  # now stale
        assert await envoy.nothing(0.3)
        assert ads.metric("ignored_requests_total", reason="stale") == 2


async def test_sotw_nack_is_never_answered_and_its_message_is_bounded(ads: Ads) -> None:
    ads.cache.set(GROUP, snapshot(20001, 8081))
    async with FakeEnvoy(ads.port) as envoy:
        envoy.send(node=node("n", gateway=GROUP), type_url=CDS)
        cds = await envoy.receive()
        for _ in range(3):  # whatever it repeats, a NACK gets no answer
            envoy.send(type_url=CDS, version_info="", response_nonce=cds.nonce,
                       error_detail={"code": 13, "message": "x" * 100_000})
        assert await envoy.nothing(0.5)
        assert ads.metric("nacks_total", type="cds") == 1  # one NACK per response
        status = ads.cache.nodes.get("n")
        assert status is not None and len(status.nacked["cds"]) == XdsServerSettings().max_error_chars + 3
        ads.cache.set(GROUP, snapshot(20001, 8081, connect_timeout_s=5))
        assert (await envoy.receive()).version_info != cds.version_info


async def test_limits_streams_and_names() -> None:
    ads = await Ads.start(XdsServerSettings(max_streams=1, max_names_per_type=2))
    try:
        ads.cache.set(GROUP, snapshot(20001, 8081))
        async with FakeEnvoy(ads.port) as first:
            first.send(node=node("n", gateway=GROUP), type_url=EDS, resource_names=["a", "b", "backend"])
            assert await first.nothing(0.3)
            assert ads.metric("ignored_requests_total", reason="too_many_names") == 1
            async with FakeEnvoy(ads.port) as second:
                second.send(node=node("m", gateway=GROUP), type_url=CDS)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await second.receive()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ads.metric("refused_streams_total") == 1
            first.send(type_url=EDS, resource_names=["backend"])
            assert names(await first.receive()) == ["backend"]
    finally:
        await ads.stop()
