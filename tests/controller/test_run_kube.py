"""``run`` in Kubernetes mode against the emulated API server (kmock): objects listed and watched
become per-Gateway xDS snapshots, edits are re-published, statuses are written by the leader, and
the admin listener reports readiness only after the first sync and snapshot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from extsvc_controller.kube import kinds as k
from extsvc_controller.serve import RunConfig, Running

from .kube_kit import Cluster, emulated_cluster, kubeconfig, seed, until

pytestmark = pytest.mark.timeout(60)



@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_cluster() as c:
        yield c


async def test_kubernetes_mode_publishes_reacts_to_edits_and_writes_statuses(
    tmp_path: Path, cluster: Cluster
) -> None:
    await seed(cluster)
    config = RunConfig(
        kubernetes=True,
        kubeconfig=kubeconfig(tmp_path, cluster),
        xds_address=("127.0.0.1", 0),
        admin_address=("127.0.0.1", 0),
        debounce_s=0.02,
        lease_namespace="default",
        identity="replica-a",
    )
    running = Running(config)
    await running.start()
    try:
        assert running.admin is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.admin.port}") as admin:
            await until(lambda: running.ready, 10, "ready after the first sync and snapshot")
            assert (await admin.get("/readyz")).status_code == 200
            metrics = (await admin.get("/metrics")).text
            assert 'extsvc_controller_kube_objects{kind="HTTPRoute"} 1.0' in metrics
        first = running.cache.get("demo/gw")
        assert first is not None
        # the leader writes the statuses onto the objects' status subresource
        await until(
            lambda: bool(cluster.stored(k.HTTPROUTE, "demo", "shop").get("status", {}).get("parents")),
            10, "HTTPRoute status written",
        )
        parents = cluster.stored(k.HTTPROUTE, "demo", "shop")["status"]["parents"]
        assert parents[0]["controllerName"] == "extsvc.dev/controller"
        await until(
            lambda: bool(cluster.stored(k.GATEWAY, "demo", "gw").get("status", {}).get("listeners")),
            10, "Gateway status written",
        )
        [listener] = cluster.stored(k.GATEWAY, "demo", "gw")["status"]["listeners"]
        assert listener["name"] == "http" and listener["attachedRoutes"] == 1
        assert {c["type"]: c["status"] for c in listener["conditions"]} == {
            "Accepted": "True", "Conflicted": "False", "ResolvedRefs": "True", "Programmed": "True"
        }
        assert all(c["observedGeneration"] == 1 for c in listener["conditions"])
        policy = cluster.stored(k.TRAFFICPOLICY, "demo", "orders")["status"]["ancestors"][0]
        assert {c["type"] for c in policy["conditions"]} >= {"Accepted", "Attached"}
        # an edit through the API is a new snapshot for that Gateway
        await cluster.patch(k.HTTPROUTE, "demo", "shop", {"spec": {"rules": [
            {"name": "only", "matches": [{"path": {"type": "PathPrefix", "value": "/only"}}],
             "backendRefs": [{"name": "backend", "port": 8080}]},
        ]}})
        await until(lambda: running.cache.get("demo/gw") != first, 10, "re-published after the edit")
        # a broken object is reported on its own status and does not stop the rest
        await cluster.create(k.TRAFFICPOLICY, "demo", "bad", spec={
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "shop"}],
            "rateLimit": {"local": {"tokenBucket": {"maxTokens": 0}}},
        })
        await until(
            lambda: "status" in cluster.stored(k.TRAFFICPOLICY, "demo", "bad"), 10, "bad policy status"
        )
        bad = cluster.stored(k.TRAFFICPOLICY, "demo", "bad")["status"]
        assert "Invalid" in str(bad) or "False" in str(bad)
        assert running.cache.get("demo/gw") is not None
    finally:
        await running.stop()
    lease = cluster.stored(k.Kind("Lease", "coordination.k8s.io", "v1", "leases"), "default",
                           "extsvc-controller")
    assert not lease["spec"].get("holderIdentity"), "the Lease is released at a clean stop"


async def test_kubernetes_mode_keeps_serving_while_the_api_is_away(
    tmp_path: Path, cluster: Cluster
) -> None:
    await seed(cluster)
    running = Running(RunConfig(
        kubernetes=True, kubeconfig=kubeconfig(tmp_path, cluster), xds_address=("127.0.0.1", 0),
        admin_address=("127.0.0.1", 0), debounce_s=0.02, leader_election=False, watch_idle_s=2.0,
    ))
    await running.start()
    try:
        await until(lambda: running.ready, 10, "ready")
        served = running.cache.get("demo/gw")
        await cluster.down()
        await asyncio.sleep(0.5)
        assert running.cache.get("demo/gw") == served  # the last good config keeps serving
        assert running.alive
        await cluster.up()
        await cluster.patch(k.HTTPROUTE, "demo", "shop", {"spec": {"hostnames": ["shop.example.com"]}})
        await until(lambda: running.cache.get("demo/gw") != served, 15, "caught up after the API came back")
    finally:
        await running.stop()
