"""The live control plane's pure and in-process parts: the cut into per-Gateway xDS resources, the
folder source, the debounced controller loop and the admin listener (no Envoy here; see
test_run_e2e.py for the real one)."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from extsvc_controller import run as run_module
from extsvc_controller.admin import AdminServer
from extsvc_controller.publish import CLUSTER, ENDPOINTS, LISTENER, ROUTES, SECRET, split
from extsvc_controller.run import Controller, ControllerMetrics, FolderSource
from extsvc_controller.sources.files import load
from extsvc_controller.translate import Options, translate
from extsvc_controller.xds.cache import SnapshotCache

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "controller" / "manifests"
CASES = Path(__file__).parent / "cases"
ENDPOINTS_OPT = {"demo/backend": ("127.0.0.1", 8081), "demo/extsvc": ("127.0.0.1", 9001)}
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

SECOND_GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: demo}
spec:
  gatewayClassName: kgateway
  listeners: [{name: http, port: 80, protocol: HTTP}]
"""


def test_each_gateway_gets_rds_eds_and_only_the_clusters_its_routes_name() -> None:
    translation = translate(load([EXAMPLE]), Options(endpoints=ENDPOINTS_OPT, per_gateway=True))
    [(group, res)] = split(translation).items()
    assert group == "demo/gw"
    listener = res.by_type[LISTENER]["listener~80"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert "route_config" not in hcm  # the table is fetched over RDS
    assert hcm["rds"] == {
        "config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": "listener~80"
    }
    assert list(res.by_type[ROUTES]) == ["listener~80"]
    assert sorted(res.by_type[CLUSTER]) == ["kube_demo_backend_8080", "kube_demo_extsvc_9001"]
    backend = res.by_type[CLUSTER]["kube_demo_backend_8080"]
    assert backend["type"] == "EDS" and "load_assignment" not in backend  # an IP: endpoints by EDS
    assert res.by_type[ENDPOINTS]["kube_demo_backend_8080"]["cluster_name"] == "kube_demo_backend_8080"
    messages = res.messages()  # parses into xds-protos' classes, every packed extension included
    assert messages[LISTENER]["listener~80"].DESCRIPTOR.full_name == "envoy.config.listener.v3.Listener"
    assert messages[ROUTES]["listener~80"].virtual_hosts


def test_a_service_without_an_address_override_keeps_resolving_its_dns_name() -> None:
    translation = translate(load([EXAMPLE]), Options(per_gateway=True))
    [res] = split(translation).values()
    backend = res.by_type[CLUSTER]["kube_demo_backend_8080"]
    assert backend["type"] == "STRICT_DNS" and "load_assignment" in backend
    assert res.by_type[ENDPOINTS] == {}


def test_tls_certificates_are_served_over_sds_never_inside_the_listener() -> None:
    translation = translate(load([CASES / "https" / "input.yaml"]), Options(per_gateway=True))
    [res] = split(translation).values()
    assert res.by_type[SECRET], "the https case has certificates"
    listener = next(iter(res.by_type[LISTENER].values()))
    for chain in listener["filter_chains"]:
        refs = chain["transport_socket"]["typed_config"]["common_tls_context"][
            "tls_certificate_sds_secret_configs"
        ]
        assert all(ref["sds_config"] == {"ads": {}, "resource_api_version": "V3"} for ref in refs)
        assert {ref["name"] for ref in refs} <= set(res.by_type[SECRET])
    assert "PRIVATE KEY" not in str(res.by_type[LISTENER])
    res.messages()


def test_two_gateways_on_the_same_port_conflict_in_one_bootstrap_but_not_over_xds(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text(SECOND_GATEWAY)
    snapshot = load([EXAMPLE, tmp_path])
    one_envoy = translate(snapshot, Options())
    other = next(s for s in one_envoy.statuses if (s.kind, s.name) == ("Gateway", "other"))
    assert any(c.reason == "ListenersNotValid" for c in other.conditions)
    per_gateway = split(translate(snapshot, Options(per_gateway=True)))
    assert sorted(per_gateway) == ["demo/gw", "demo/other"]
    assert list(per_gateway["demo/other"].by_type[LISTENER]) == ["listener~80"]
    assert per_gateway["demo/other"].by_type[CLUSTER] == {}  # no route: no cluster sent


ENDPOINT_SLICE = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: backend-abc, namespace: demo, labels: {kubernetes.io/service-name: backend}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: false}
- addresses: [10.0.0.3]
  conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: extsvc-x, namespace: demo, labels: {kubernetes.io/service-name: extsvc}}
addressType: IPv4
ports: [{name: metrics, port: 9090}]
endpoints: [{addresses: [10.0.0.9]}]
"""


def test_endpoint_slices_become_eds_with_the_ready_pods_on_the_target_port(tmp_path: Path) -> None:
    (tmp_path / "slices.yaml").write_text(ENDPOINT_SLICE)
    [res] = split(translate(load([EXAMPLE, tmp_path]), Options(per_gateway=True))).values()
    assert res.by_type[CLUSTER]["kube_demo_backend_8080"]["type"] == "EDS"
    assignment = res.by_type[ENDPOINTS]["kube_demo_backend_8080"]
    addresses = [
        lb["endpoint"]["address"]["socket_address"]
        for locality in assignment["endpoints"]
        for lb in locality["lb_endpoints"]
    ]
    assert addresses == [
        {"address": "10.0.0.1", "port_value": 8081}, {"address": "10.0.0.3", "port_value": 8081}
    ]
    # a slice without the Service port's name says nothing about it: DNS, as before
    assert res.by_type[CLUSTER]["kube_demo_extsvc_9001"]["type"] == "STRICT_DNS"


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLE, folder)
    return folder


async def test_the_folder_loop_publishes_once_per_change_and_only_changed_gateways(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry)
    cache = SnapshotCache()
    source = FolderSource([folder], metrics, interval_s=0.02)
    controller = Controller(
        source.snapshot, Options(endpoints=ENDPOINTS_OPT), cache, metrics, debounce_s=0.05
    )
    source.on_change = controller.changed
    tasks = [asyncio.create_task(source.run()), asyncio.create_task(controller.run())]
    try:
        async with asyncio.timeout(10):
            await controller.built.wait()
        first = cache.get("demo/gw")
        assert first is not None and controller.generation == 1
        # a burst of edits is one snapshot
        route = folder / "gateway.yaml"
        text = route.read_text()
        for n in range(5):
            route.write_text(text + f"# edit {n}\n")
            await asyncio.sleep(0.005)
        async with asyncio.timeout(10):
            while controller.generation < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert controller.generation == 2
        # only a comment changed: the Gateway's xDS content is the same, nothing is pushed
        assert cache.get("demo/gw") == first
        assert registry.get_sample_value("extsvc_controller_gateway_snapshots_changed_total") == 1
        # a real change: a new Gateway appears as a new group
        (folder / "other.yaml").write_text(SECOND_GATEWAY)
        async with asyncio.timeout(10):
            while cache.get("demo/other") is None:
                await asyncio.sleep(0.02)
        assert registry.get_sample_value("extsvc_controller_snapshot_builds_total", {"result": "ok"}) == 3
        # a broken file keeps the last good snapshot
        (folder / "broken.yaml").write_text("kind: [unclosed\n")
        async with asyncio.timeout(10):
            while not registry.get_sample_value("extsvc_controller_source_errors_total"):
                await asyncio.sleep(0.02)
        assert cache.get("demo/other") is not None and controller.generation == 3
        # a Gateway removed from the manifests is removed from the cache
        os.remove(folder / "broken.yaml")
        os.remove(folder / "other.yaml")
        async with asyncio.timeout(10):
            while cache.get("demo/other") is not None:
                await asyncio.sleep(0.02)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_build_freezes_what_it_left_and_every_nth_collects_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    metrics = ControllerMetrics(CollectorRegistry())
    source = FolderSource([folder], metrics)
    assert source.check()
    controller = Controller(source.snapshot, Options(endpoints=ENDPOINTS_OPT), SnapshotCache(), metrics)
    monkeypatch.setattr(run_module, "FULL_GC_EVERY", 2)
    collections: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real_collect(*a))
    try:
        gc.unfreeze()
        assert await controller.build()
        assert gc.get_freeze_count() > 0 and collections == []  # frozen, no full collection
        assert await controller.build()
        assert collections == [1]  # the second build: a full collection, then frozen again
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


@pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")
async def test_a_folder_change_is_seen_at_once_not_at_the_next_poll(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "sub").mkdir()
    registry = CollectorRegistry()
    source = FolderSource([folder], ControllerMetrics(registry), interval_s=60)  # a poll: never
    changes: list[float] = []
    source.on_change = lambda: changes.append(time.monotonic())
    task = asyncio.create_task(source.run())
    try:
        async with asyncio.timeout(10):
            await source.synced.wait()
        await asyncio.sleep(0.1)
        for target in (folder / "gateway.yaml", folder / "sub" / "more.yaml"):  # in a subfolder too
            seen = len(changes)
            target.write_text(SECOND_GATEWAY if target.name == "more.yaml"
                              else target.read_text() + "# edited\n")
            began = time.monotonic()
            async with asyncio.timeout(5):
                while len(changes) == seen:
                    await asyncio.sleep(0.01)
            assert changes[-1] - began < 2  # not 60 s
        assert registry.get_sample_value("extsvc_controller_folder_wakeups_total") >= 2
        # a file replaced by a rename (how editors save) is seen too
        seen = len(changes)
        staged = tmp_path / "staged.yaml"
        staged.write_text((folder / "gateway.yaml").read_text() + "# renamed in\n")
        os.replace(staged, folder / "gateway.yaml")
        async with asyncio.timeout(5):
            while len(changes) == seen:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_admin_answers_probes_and_metrics() -> None:
    registry = CollectorRegistry()
    ControllerMetrics(registry)
    state = {"ready": False}
    admin = AdminServer(registry, lambda: state["ready"], lambda: True)
    await admin.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin.port}") as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            state["ready"] = True
            assert (await client.get("/readyz")).status_code == 200
            metrics = await client.get("/metrics")
            assert "extsvc_controller_snapshot_builds_total" in metrics.text
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/readyz")).status_code == 405
        # a request that never ends its headers is cut at the size bound
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nx: " + b"a" * 20_000)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        await admin.stop()


@pytest.mark.parametrize("argv", [["--xds", "nope", "--gateway", "demo/gw"], ["--xds", "127.0.0.1:1"]])
def test_render_xds_refuses_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from extsvc_controller.cli import main

    assert main(["render", *argv]) == 2
    assert capsys.readouterr().err.startswith("extsvc-controller: --")


def test_a_rebuild_from_the_memo_is_the_build_from_scratch() -> None:
    """The live controller reuses routes built from the same objects (extsvc_controller.memo):
    after edits, its xDS content and statuses equal those of a controller that builds it all."""
    import copy

    import yaml

    from extsvc_controller.kube.wiring import ParseCache

    docs = [d for p in sorted(EXAMPLE.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    docs += [d for d in yaml.safe_load_all(SECOND_GATEWAY) if d]
    docs.append({  # a route no edit touches: its Envoy route is the one built first
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "steady", "namespace": "demo", "resourceVersion": "1"},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/steady"}}],
            "backendRefs": [{"name": "backend", "port": 8080}],
        }]},
    })
    options = Options(endpoints=ENDPOINTS_OPT)

    def controller() -> Controller:
        return Controller(lambda: load([]), options, SnapshotCache(), ControllerMetrics(CollectorRegistry()))

    live, cache = controller(), ParseCache()
    live.translate_snapshot(cache.snapshot(docs))
    for step in range(3):
        docs = copy.deepcopy(docs)
        route = next(d for d in docs if d["kind"] == "HTTPRoute")
        route["spec"]["rules"][step]["matches"] = [{"path": {"type": "Exact", "value": f"/edit{step}"}}]
        policy = next(d for d in docs if d["kind"] == "TrafficPolicy" and d["metadata"]["name"] == "orders")
        policy["spec"]["rateLimit"]["global"]["descriptors"][0]["entries"][0]["generic"]["value"] = f"v{step}"
        for d in (route, policy):
            d["metadata"]["resourceVersion"] = f"edit-{step}"
        reused, reused_snapshots = live.translate_snapshot(cache.snapshot(docs))
        fresh, fresh_snapshots = controller().translate_snapshot(ParseCache().snapshot(docs))
        assert {g: s.version for g, s in reused_snapshots.items()} == {
            g: s.version for g, s in fresh_snapshots.items()
        }
        assert reused.statuses == fresh.statuses
    assert live._memo.routes.hits > 0, "the memo was used"


def _docs_section(title: str) -> str:
    text = (ROOT / "docs" / "controller.md").read_text()
    start = text.index(title)
    level = title.split(" ", 1)[0]  # "##" or "###": the section ends at the next one as high
    ends = [text.find(f"\n{mark} ", start + len(title)) for mark in ("##", level)]
    return text[start : min(e for e in ends if e > 0)]


def test_every_run_option_is_documented() -> None:
    from extsvc_controller.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    documented = _docs_section("## `run`: the live control plane")
    missing = [
        opt for action in run._actions for opt in action.option_strings
        if opt.startswith("--") and opt not in ("--help", "--log-level") and opt not in documented
    ]
    assert not missing, missing


def test_the_documented_metrics_exist() -> None:
    import re

    from prometheus_client import generate_latest

    from extsvc_controller.kube.metrics import KubeMetrics
    from extsvc_controller.xds.metrics import XdsMetrics

    registry = CollectorRegistry()
    ControllerMetrics(registry)
    KubeMetrics(registry)
    XdsMetrics.create(registry)
    exported = generate_latest(registry).decode()
    names = re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", _docs_section("### Probes and metrics"))
    assert len(names) > 10
    # the prefix itself, and label values (sotw, cds, ...) are not metric names
    names = [n for n in names if not n.endswith("_") and ("_" in n or n == "leader")]
    missing = [n for n in names if f"extsvc_controller_{n}" not in exported]
    assert not missing, missing
    assert "extsvc_controller_leader " in exported


def test_only_the_gateways_of_the_given_classes_are_served_and_reported(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text(
        SECOND_GATEWAY.replace("gatewayClassName: kgateway", "gatewayClassName: istio")
        + """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: theirs, namespace: demo}
spec:
  parentRefs: [{name: other}]
  rules: [{backendRefs: [{name: backend, port: 8080}]}]
"""
    )
    snapshot = load([EXAMPLE, tmp_path])
    mine = translate(snapshot, Options(per_gateway=True, gateway_classes=("kgateway",)))
    assert sorted(split(mine)) == ["demo/gw"]
    reported = {(s.kind, s.name) for s in mine.statuses}
    assert ("Gateway", "other") not in reported and ("HTTPRoute", "theirs") not in reported
    assert ("HTTPRoute", "shop") in reported
    everything = translate(snapshot, Options(per_gateway=True))
    assert sorted(split(everything)) == ["demo/gw", "demo/other"]
