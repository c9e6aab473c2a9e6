"""The Kubernetes layer against an emulated API server over real HTTP (kmock + kube_kit):
KubeSource (list/watch/resume/relist/backoff), StatusWriter and LeaderElector."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from prometheus_client import CollectorRegistry

from extsvc_controller.kube import Backoff, KubeMetrics, KubeSource, LeaderElector, StatusWriter
from extsvc_controller.kube import kinds as k
from extsvc_controller.results import Ancestor, Condition, Status

from .kube_kit import LEASE, Cluster, emulated_cluster, until

pytestmark = pytest.mark.timeout(15)

FAST = Backoff(base=0.02, cap=0.1)
CTL = "extsvc.dev/controller"


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_cluster() as c:
        yield c


@contextlib.asynccontextmanager
async def running(cluster: Cluster, **kw: Any) -> AsyncIterator[KubeSource]:
    client = cluster.client()
    kw.setdefault("backoff", FAST)
    src = KubeSource(client, metrics=KubeMetrics(CollectorRegistry()), **kw)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(src.synced.wait(), 5)
        yield src
    finally:
        src.stop()
        await asyncio.wait_for(task, 5)
        await client.close()


def names(src: KubeSource, kind: str) -> list[str]:
    objs = [o["metadata"] for o in src.objects() if o["kind"] == kind]
    return [f"{m['namespace']}/{m['name']}" for m in objs]


def value(metrics: KubeMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(f"extsvc_controller_{name}", labels)
    return v or 0.0


def tls(name: str) -> dict[str, Any]:
    return {"type": "kubernetes.io/tls", "data": {"tls.crt": "Y3J0", "tls.key": "a2V5"}}


# --- KubeSource ----------------------------------------------------------------------------------


async def test_list_then_live_events_across_namespaces(cluster: Cluster) -> None:
    await cluster.create(k.HTTPROUTE, "a", "r1", spec={"hostnames": ["a"]})
    await cluster.create(k.SECRET, "a", "cert", **tls("cert"))
    await cluster.create(k.SECRET, "a", "opaque", type="Opaque", data={"password": "c2VjcmV0"})
    changes: list[int] = []
    async with running(cluster, on_change=lambda: changes.append(1)) as src:
        assert names(src, "HTTPRoute") == ["a/r1"]
        assert names(src, "Secret") == ["a/cert"]  # the Opaque one is not kept at all
        assert "c2VjcmV0" not in repr(src.objects())
        assert value(src.metrics, "kube_objects", kind="Secret") == 1
        await cluster.create(k.HTTPROUTE, "b", "r2", spec={"hostnames": ["b"]})
        await until(lambda: names(src, "HTTPRoute") == ["a/r1", "b/r2"], what="ADDED in another namespace")
        await cluster.patch(k.HTTPROUTE, "b", "r2", {"spec": {"hostnames": ["c"]}})
        await until(lambda: src.get("HTTPRoute", "b", "r2")["spec"]["hostnames"] == ["c"])  # type: ignore[index]
        assert src.get("HTTPRoute", "b", "r2")["metadata"]["generation"] == 2  # type: ignore[index]
        await cluster.delete(k.HTTPROUTE, "a", "r1")
        await until(lambda: names(src, "HTTPRoute") == ["b/r2"], what="DELETED")
        await cluster.create(k.SECRET, "b", "opaque2", type="Opaque", data={"x": "eA=="})
        await cluster.create(k.SECRET, "b", "cert2", **tls("cert2"))
        await until(lambda: names(src, "Secret") == ["a/cert", "b/cert2"])
        assert changes  # every applied change was announced
        first = src.objects()[0]
        assert (first["kind"], first["apiVersion"]) == ("HTTPRoute", k.HTTPROUTE.api_version)


async def test_a_status_only_change_is_kept_but_starts_no_rebuild(cluster: Cluster) -> None:
    # Every status write (ours too: 2,000 of them after a leader change) comes back as a MODIFIED
    # event; the translator reads no status, so those must not each cost a snapshot build.
    await cluster.create(k.HTTPROUTE, "a", "r1", spec={"hostnames": ["a"]})
    changes: list[int] = []
    async with running(cluster, on_change=lambda: changes.append(1)) as src:
        [(_, stamp)] = src.stamped()
        seen = len(changes)
        await cluster.patch_status(k.HTTPROUTE, "a", "r1", {"parents": [{"controllerName": CTL}]})
        await until(lambda: "status" in src.get("HTTPRoute", "a", "r1"), what="the status kept")  # type: ignore[operator]
        await asyncio.sleep(0.1)
        assert len(changes) == seen and src.stamped()[0][1] == stamp
        await cluster.patch(k.HTTPROUTE, "a", "r1", {"metadata": {"labels": {"team": "x"}}})
        await until(lambda: len(changes) > seen, what="a label change announced")
        assert src.stamped()[0][1] != stamp


async def test_namespace_filter(cluster: Cluster) -> None:
    await cluster.create(k.SERVICE, "a", "s1", spec={})
    await cluster.create(k.SERVICE, "b", "s2", spec={})
    async with running(cluster, namespaces=["a"]) as src:
        assert names(src, "Service") == ["a/s1"]
        await cluster.create(k.SERVICE, "b", "s3", spec={})
        await cluster.create(k.SERVICE, "a", "s4", spec={})
        await until(lambda: names(src, "Service") == ["a/s1", "a/s4"])
        await asyncio.sleep(0.1)
        assert names(src, "Service") == ["a/s1", "a/s4"]
    watches = [r for r in cluster.emulator if r.params.get("watch") == "true"]
    assert watches and all("/namespaces/a/" in r.url.path for r in watches)


async def test_watch_end_is_resumed_from_last_resource_version(cluster: Cluster) -> None:
    cluster.emulator.watch_limit = 0.2  # the server ends every watch after 0.2 s (with a BOOKMARK)
    await cluster.create(k.GATEWAY, "a", "gw", spec={})
    async with running(cluster, kinds=[k.GATEWAY]) as src:
        await until(lambda: value(src.metrics, "kube_watch_restarts_total", kind="Gateway") >= 2)
        await cluster.create(k.GATEWAY, "a", "gw2", spec={})
        await until(lambda: names(src, "Gateway") == ["a/gw", "a/gw2"])
        assert value(src.metrics, "kube_relists_total", kind="Gateway") == 0
    watches = [r for r in cluster.emulator if r.params.get("watch") == "true"]
    assert watches[0].params.get("allowWatchBookmarks") == "true"
    resumed = [r.params.get("resourceVersion") for r in watches[1:]]
    assert resumed and all(rv and rv.isdigit() for rv in resumed)


async def test_410_on_resume_relists_and_drops_objects_deleted_while_away(cluster: Cluster) -> None:
    cluster.emulator.watch_limit = 0.2
    await cluster.create(k.TRAFFICPOLICY, "a", "keep", spec={})
    await cluster.create(k.TRAFFICPOLICY, "a", "gone", spec={})
    async with running(cluster, kinds=[k.TRAFFICPOLICY]) as src:
        assert names(src, "TrafficPolicy") == ["a/gone", "a/keep"]
        # Deleted without an event reaching this client (it happened "while away")...
        tps = kmock.resource("gateway.kgateway.dev/v1alpha1/trafficpolicies")
        cluster.emulator.objects[tps, "a", "gone"].delete()
        # ...and the next resume is answered with 410 Gone.
        expired = {
            "type": "ERROR",
            "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                       "reason": "Expired", "message": "too old resource version"},
        }
        cluster.emulator[
            kmock.action.WATCH, kmock.resource("gateway.kgateway.dev/v1alpha1/trafficpolicies"),
            lambda req: "resourceVersion" in req.params,
        ] << iter([expired])
        await until(lambda: names(src, "TrafficPolicy") == ["a/keep"], what="relist dropped the deleted one")
        assert value(src.metrics, "kube_relists_total", kind="TrafficPolicy") == 1


async def test_api_503_then_back_reconnects_with_backoff(cluster: Cluster) -> None:
    cluster.emulator.watch_limit = 0.2
    down = asyncio.Event()
    for action in (kmock.action.WATCH, kmock.action.LIST):
        cluster.emulator[down, action] << kmock.KubernetesError(status=503, reason="ServiceUnavailable")
    delays: list[float] = []

    async def sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(d)

    async with running(cluster, kinds=[k.SERVICE], sleep=sleep) as src:
        down.set()
        await until(lambda: value(src.metrics, "kube_watch_errors_total", kind="Service") >= 3)
        await cluster.create(k.SERVICE, "a", "late", spec={})  # writes still work; watches fail
        down.clear()
        await until(lambda: names(src, "Service") == ["a/late"], what="caught up after the outage")
    assert delays and max(delays) <= FAST.cap


async def test_api_server_restarted_on_same_port(cluster: Cluster) -> None:
    cluster.emulator.watch_limit = 0.2  # the server's shutdown waits for open watches to end
    async with running(cluster, kinds=[k.SERVICE]) as src:
        await cluster.down()  # connection refused from now on
        await until(lambda: value(src.metrics, "kube_watch_errors_total", kind="Service") >= 2)
        await cluster.up()
        await cluster.create(k.SERVICE, "a", "after", spec={})
        await until(lambda: names(src, "Service") == ["a/after"], what="reconnected after restart")


async def test_objects_per_kind_cap(cluster: Cluster) -> None:
    for i in range(3):
        await cluster.create(k.SERVICE, "a", f"s{i}", spec={})
    async with running(cluster, kinds=[k.SERVICE], max_objects_per_kind=2) as src:
        assert len(names(src, "Service")) == 2
        await cluster.create(k.SERVICE, "a", "s9", spec={})
        await asyncio.sleep(0.1)
        assert len(names(src, "Service")) == 2
        assert value(src.metrics, "kube_objects_dropped_total", kind="Service", reason="limit") >= 2


# --- StatusWriter --------------------------------------------------------------------------------


def route_status() -> Status:
    return Status("HTTPRoute", "a", "r", [
        Condition("Accepted", "True", "Accepted", "parent a/gw"),
        Condition("ResolvedRefs", "True", "ResolvedRefs"),
    ])


def policy_status() -> Status:
    conds = (Condition("Accepted", "True", "Valid", "Policy accepted"),
             Condition("Attached", "True", "Attached", "Attached to all targets"))
    return Status("TrafficPolicy", "a", "tp", [], [Ancestor("a", "gw", conds)])


def patches(cluster: Cluster) -> list[Any]:
    return [r for r in cluster.emulator if r.method == kmock.method.PATCH and r.subresource == "status"]


async def seed_route(cluster: Cluster) -> None:
    await cluster.create(k.HTTPROUTE, "a", "r", spec={"parentRefs": [{"name": "gw"}]})
    await cluster.patch(k.HTTPROUTE, "a", "r", {"spec": {"parentRefs": [{"name": "gw"}], "rules": []}})


async def test_status_written_to_subresource_once(cluster: Cluster) -> None:
    await seed_route(cluster)  # generation 2
    await cluster.create(k.TRAFFICPOLICY, "a", "tp", spec={"targetRefs": []})
    client = cluster.client()
    async with running(cluster, kinds=[k.HTTPROUTE, k.TRAFFICPOLICY]) as src:
        w = StatusWriter(client, controller_name=CTL, leader=lambda: True, metrics=src.metrics)
        res = await w.write([route_status(), policy_status()], src.objects())
        assert (res.written, res.failed) == (2, 0)
        sent = patches(cluster)
        assert [r.url.path for r in sent] == [
            cluster.path(k.HTTPROUTE, "a", "r", "status"), cluster.path(k.TRAFFICPOLICY, "a", "tp", "status")]
        assert all(r.headers["Content-Type"] == "application/merge-patch+json" for r in sent)
        assert all(set(r.data) <= {"status", "metadata"} for r in sent)  # never spec or annotations
        route = cluster.stored(k.HTTPROUTE, "a", "r")
        (parent,) = route["status"]["parents"]
        assert parent["controllerName"] == CTL and parent["parentRef"] == {"name": "gw"}
        assert {c["type"]: c["observedGeneration"] for c in parent["conditions"]} == {
            "Accepted": 2, "ResolvedRefs": 2}
        tp = cluster.stored(k.TRAFFICPOLICY, "a", "tp")
        (anc,) = tp["status"]["ancestors"]
        assert anc["ancestorRef"] == {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                      "namespace": "a", "name": "gw"}
        # Unchanged: not rewritten, before the source saw our write and after.
        again = await w.write([route_status(), policy_status()], src.objects())
        assert again.written == 0 and again.unchanged == 2
        await until(lambda: "status" in (src.get("HTTPRoute", "a", "r") or {}))
        await until(lambda: "status" in (src.get("TrafficPolicy", "a", "tp") or {}))
        again = await w.write([route_status(), policy_status()], src.objects())
        assert again.written == 0 and len(patches(cluster)) == 2
        assert value(src.metrics, "status_skipped_unchanged_total", kind="HTTPRoute") == 2
        assert value(src.metrics, "status_writes_total", kind="HTTPRoute", result="ok") == 1
        # A changed condition is written, and keeps the lastTransitionTime of unchanged ones.
        ltt = parent["conditions"][0]["lastTransitionTime"]
        changed = route_status()
        changed.conditions[1] = Condition("ResolvedRefs", "False", "BackendNotFound")
        assert (await w.write([changed], src.objects())).written == 1
        conds = cluster.stored(k.HTTPROUTE, "a", "r")["status"]["parents"][0]["conditions"]
        assert conds[0]["lastTransitionTime"] == ltt and conds[1]["status"] == "False"
    await client.close()


async def test_other_controllers_parents_are_kept(cluster: Cluster) -> None:
    await seed_route(cluster)
    other = {"parentRef": {"name": "theirs"}, "controllerName": "other.io/ctl",
             "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                             "lastTransitionTime": "2020-01-01T00:00:00Z"}]}
    await cluster._call("PATCH", cluster.path(k.HTTPROUTE, "a", "r", "status"),
                        {"status": {"parents": [other]}}, "application/merge-patch+json")
    client = cluster.client()
    async with running(cluster, kinds=[k.HTTPROUTE]) as src:
        await until(lambda: "status" in (src.get("HTTPRoute", "a", "r") or {}))
        w = StatusWriter(client, controller_name=CTL, leader=lambda: True)
        assert (await w.write([route_status()], src.objects())).written == 1
        parents = cluster.stored(k.HTTPROUTE, "a", "r")["status"]["parents"]
        assert [p["controllerName"] for p in parents] == ["other.io/ctl", CTL]
        assert parents[0] == other
        assert "resourceVersion" in patches(cluster)[-1].data["metadata"]  # no lost update of theirs
    await client.close()


async def test_nothing_written_when_not_leader(cluster: Cluster) -> None:
    await seed_route(cluster)
    client = cluster.client()
    async with running(cluster, kinds=[k.HTTPROUTE]) as src:
        w = StatusWriter(client, controller_name=CTL, leader=lambda: False)
        res = await w.write([route_status()], src.objects())
        assert res.not_leader and res.written == 0 and patches(cluster) == []
    await client.close()


# --- LeaderElector -------------------------------------------------------------------------------

TIMES = {"lease_duration": 0.6, "renew_deadline": 0.4, "retry_period": 0.05}


def elector(client: AsyncClient, ident: str, **kw: Any) -> LeaderElector:
    return LeaderElector(client, namespace="sys", name="extsvc-controller", identity=ident,
                         metrics=KubeMetrics(CollectorRegistry()), **{**TIMES, **kw})


async def test_one_leader_then_handover_on_release_and_on_expiry(cluster: Cluster) -> None:
    c1, c2, c3 = cluster.client(), cluster.client(), cluster.client()
    events: list[str] = []
    e1 = elector(c1, "one", on_started_leading=lambda: events.append("one+"),
                 on_stopped_leading=lambda: events.append("one-"))
    e2 = elector(c2, "two")
    t1 = asyncio.create_task(e1.run())
    await until(lambda: e1.is_leader)
    t2 = asyncio.create_task(e2.run())
    await asyncio.sleep(0.3)
    assert e1.is_leader and not e2.is_leader
    # Graceful stop releases: the standby takes over well before the lease would expire.
    loop = asyncio.get_running_loop()
    e1.stop()
    await t1
    stopped = loop.time()
    assert events == ["one+", "one-"] and not e1.is_leader
    await until(lambda: e2.is_leader, timeout=2)
    assert loop.time() - stopped < TIMES["lease_duration"]
    assert e2.metrics.registry.get_sample_value("extsvc_controller_leader") == 1
    # A killed leader (no release): a third candidate takes over after the expiry.
    e3 = elector(c3, "three")
    t3 = asyncio.create_task(e3.run())
    await asyncio.sleep(0.2)
    assert not e3.is_leader
    t2.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await t2
    killed = loop.time()
    await until(lambda: e3.is_leader, timeout=3)
    assert loop.time() - killed >= TIMES["lease_duration"] * 0.9
    lease = await c3.get(Lease, "extsvc-controller", namespace="sys")
    assert lease.spec is not None and lease.spec.holderIdentity == "three"
    assert (lease.spec.leaseTransitions or 0) >= 2
    e3.stop()
    await t3
    for c in (c1, c2, c3):
        await c.close()


async def test_losing_the_lease_stops_status_writes_at_once(cluster: Cluster) -> None:
    await seed_route(cluster)
    c1, thief = cluster.client(), cluster.client()
    e1 = elector(c1, "one")
    t1 = asyncio.create_task(e1.run())
    await until(lambda: e1.is_leader)
    async with running(cluster, kinds=[k.HTTPROUTE]) as src:
        w = StatusWriter(c1, controller_name=CTL, leader=lambda: e1.is_leader)
        # Someone else takes the Lease (a write with the current resourceVersion wins; a renewal
        # between our read and our write makes it a 409: read again).
        for _ in range(20):
            lease = await thief.get(Lease, "extsvc-controller", namespace="sys")
            assert lease.spec is not None
            lease.spec.holderIdentity = "thief"
            try:
                await thief.replace(lease)
                break
            except ApiError as exc:
                assert exc.status.code == 409
        else:
            pytest.fail("the Lease could not be taken")
        await until(lambda: not e1.is_leader, timeout=TIMES["retry_period"] * 6)
        res = await w.write([route_status()], src.objects())
        assert res.not_leader and patches(cluster) == []
    e1.stop()
    await t1
    stored = cluster.stored(LEASE, "sys", "extsvc-controller")
    assert stored["spec"]["holderIdentity"] == "thief"  # stop() did not release someone else's Lease
    await c1.close()
    await thief.close()


async def test_stale_lease_write_conflicts(cluster: Cluster) -> None:
    client = cluster.client()
    lease = await client.create(Lease(metadata=ObjectMeta(name="l", namespace="sys")))
    fresh = await client.get(Lease, "l", namespace="sys")
    await client.replace(fresh)
    with pytest.raises(Exception) as err:
        await client.replace(lease)  # stale resourceVersion
    assert getattr(getattr(err.value, "status", None), "code", None) == 409
    await client.close()


async def test_a_kind_the_api_does_not_serve_does_not_hold_back_the_sync(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 on a list (its CRD is not installed, e.g. no GRPCRoute in an older Gateway API):
    none of that kind, said once; the source still syncs, and finds the kind once it is served."""
    from extsvc_controller.kube import watch as watch_module

    monkeypatch.setattr(watch_module, "NOT_SERVED_RETRY_S", 0.05)
    widget = k.Kind("Widget", "example.com", "v1", "widgets")
    await cluster.create(k.HTTPROUTE, "a", "r1", spec={"hostnames": ["a"]})
    async with running(cluster, kinds=[k.HTTPROUTE, widget]) as src:  # waits for the sync
        assert names(src, "HTTPRoute") == ["a/r1"]
        assert caplog.text.count("is not served by the API server") == 1
        await cluster.create(widget, "a", "w1", spec={})  # the kind is served from now on
        await until(lambda: names(src, "Widget") == ["a/w1"], 5, "found once served")
