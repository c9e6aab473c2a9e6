"""The live control plane at scale (1,000 HTTPRoutes + 1,000 TrafficPolicies, as controller_bench.py
generates them): how long one edit takes to rebuild, how long until Envoy applies it, and the
controller's memory.

1. In process: a full build (parse every manifest, translate, cut into xDS resources, hash them)
   against the rebuild after one edited route (its parse only, then the same steps), best of
   ``--repeat``. Targets: the rebuild < 200 ms.
2. Live: ``extsvc-controller run -f DIR`` (a separate process) feeds a real Envoy over ADS, in
   front of ``extsvc serve`` and an echo backend. ``--edits`` times, one route's file gets a new
   ``x-edit`` request header; the time from the write until a request through Envoy carries it is
   recorded (p50, p99). Target: p99 < 1 s. Two sources: a folder of files (the poll interval,
   ``--poll-interval``, is part of that time) and an emulated Kubernetes API (kmock, as in the
   tests; an edit is a merge-patch the controller's watch sees at once; another replica holds
   the Lease and renews it, so the measured controller is a standby that writes no status).
3. The controller's RSS with that snapshot loaded, and its peak. Target < 200 MB.

    .venv/bin/python bench/controller_live.py [--routes 1000] [--edits 50] [--source folder|kube|both]
        [--poll-interval 0.1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from controller_bench import documents
from prometheus_client import CollectorRegistry

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port
from extsvc_controller.kube.wiring import ParseCache
from extsvc_controller.results import Options, Snapshot
from extsvc_controller.run import Controller, ControllerMetrics
from extsvc_controller.xds.cache import SnapshotCache

EXTSVC_CONFIG = """\
# every request allowed, ext_proc passes through, unknown rate-limit domains are OK
default_policy: allow
policies:
  allow: {steps: [{plugin: allow}]}
"""


def versioned(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents with a resourceVersion each, as the API server gives them."""
    for n, doc in enumerate(docs, 1):
        doc["metadata"]["resourceVersion"] = str(n)
    return docs


def edited(doc: dict[str, Any], marker: str) -> dict[str, Any]:
    """The route with a RequestHeaderModifier that sets ``x-edit: <marker>`` on its first rule
    (and a new resourceVersion, as an edit through the API server gets)."""
    out = copy.deepcopy(doc)
    out["metadata"]["resourceVersion"] = f"{doc['metadata'].get('resourceVersion', '0')}-{marker}"
    out["spec"]["rules"][0]["filters"] = [{
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "x-edit", "value": marker}]},
    }]
    return out


def build(controller: Controller, cache: ParseCache, docs: list[dict[str, Any]]) -> float:
    """One build as ``run`` makes it: parse what changed, translate, cut, hash."""
    began = time.perf_counter()
    controller.translate_snapshot(cache.snapshot(docs))
    return time.perf_counter() - began


def controller_for(options: Options) -> Controller:
    return Controller(
        lambda: Snapshot(()), options, SnapshotCache(), ControllerMetrics(CollectorRegistry())
    )


def in_process(n: int, repeat: int) -> None:
    docs = versioned(documents(n))
    options = Options(endpoints={"demo/backend": ("127.0.0.1", 1)})
    build(controller_for(options), ParseCache(), documents(5))  # imports, validators
    full = edit = float("inf")
    for k in range(repeat):
        cache, controller = ParseCache(), controller_for(options)
        full = min(full, build(controller, cache, docs))
        changed = list(docs)
        index = next(i for i, d in enumerate(docs) if d["kind"] == "HTTPRoute")
        changed[index] = edited(docs[index], f"m{k}")
        edit = min(edit, build(controller, cache, changed))
    print(f"{n} HTTPRoutes + {n} TrafficPolicies, in process (best of {repeat})")
    print(f"  full build (parse all, translate, xDS cut, hash): {full * 1000:7.0f} ms (baseline)")
    print(f"  one edited route, rebuilt:                       {edit * 1000:7.0f} ms "
          f"(target < 200 ms; {edit / full:.2f}x the full build)")


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class FolderInput:
    """The manifests as files (one per route and per policy); an edit rewrites one file."""

    def __init__(self, tmp: Path, docs: list[dict[str, Any]], poll_s: float) -> None:
        self.folder = tmp / "manifests"
        self.folder.mkdir()
        self.poll_s = poll_s
        (self.folder / "base.yaml").write_text(yaml.safe_dump_all(
            [d for d in docs if d["kind"] not in ("HTTPRoute", "TrafficPolicy")]
        ))
        for d in docs:
            if d["kind"] in ("HTTPRoute", "TrafficPolicy"):
                (self.folder / f"{d['kind']}-{d['metadata']['name']}.yaml").write_text(yaml.safe_dump(d))

    def args(self) -> list[str]:
        return ["-f", str(self.folder), "--poll-interval", str(self.poll_s)]

    def edit(self, route: dict[str, Any]) -> None:
        path = self.folder / f"HTTPRoute-{route['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(route))

    def describe(self) -> str:
        return f"folder, polled every {self.poll_s * 1000:.0f} ms"

    def close(self) -> None:
        pass


class KubeInput:
    """An emulated API server (kmock, as the tests use it) in a thread of its own: the objects are
    created through its HTTP API, an edit is a merge-patch, the controller watches it."""

    def __init__(self, tmp: Path, docs: list[dict[str, Any]]) -> None:
        import asyncio
        import threading

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.controller.kube_kit import Cluster, KubeEmulator

        from extsvc_controller.kube.kinds import KINDS

        self._kinds = {k.kind: k for k in KINDS}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def up() -> Any:
            emulator = KubeEmulator()
            await emulator.__aenter__()
            cluster = Cluster(emulator)
            await cluster.up()
            return emulator, cluster

        self._emulator, self.cluster = self._run(up())
        self._run(self._seed(docs))
        self.kubeconfig = tmp / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "k",
            "clusters": [{"name": "k", "cluster": {"server": self.cluster.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}],
        }))

    def _run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(300)

    async def _seed(self, docs: list[dict[str, Any]]) -> None:
        """The objects, stored directly (kmock's store takes quadratic time through its API; the
        controller starts after this, so no watch event is missed)."""
        import kmock

        for n, d in enumerate(docs, 1):
            kind = self._kinds[d["kind"]]
            meta = {**d["metadata"], "resourceVersion": str(n), "uid": f"uid-{n}", "generation": 1}
            res = kmock.resource(kind.group, kind.version, kind.plural)
            self._emulator.objects[res, meta["namespace"], meta["name"]] = {**d, "metadata": meta}
        # Another replica holds the leader Lease: the measured controller is a standby that serves
        # xDS and writes no status (kmock takes ~150 ms per status patch at 2,000 objects, and
        # 2,000 of them would stand between every edit and the API's answer).
        self._renew_lease(1)

    def _renew_lease(self, n: int) -> None:
        """The other replica renews its Lease every 2 s, as a live leader does (a candidate
        counts a Lease expired after 15 s without a renewal, whatever its duration says)."""
        import kmock

        lease = kmock.resource("coordination.k8s.io", "v1", "leases")
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        self._emulator.objects[lease, "default", "extsvc-controller"] = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "extsvc-controller", "namespace": "default",
                         "resourceVersion": f"lease-{n}"},
            "spec": {"holderIdentity": "the-leader", "leaseDurationSeconds": 15,
                     "acquireTime": now, "renewTime": f"{now[:-8]}.{n % 1000000:06d}Z",
                     "leaseTransitions": 0},
        }
        self._loop.call_later(2.0, self._renew_lease, n + 1)

    def args(self) -> list[str]:
        return ["--kubernetes", "--kubeconfig", str(self.kubeconfig), "--lease-namespace", "default"]

    def edit(self, route: dict[str, Any]) -> None:
        meta = route["metadata"]
        self._run(self.cluster.patch(
            self._kinds["HTTPRoute"], meta["namespace"], meta["name"], {"spec": route["spec"]}
        ))

    def describe(self) -> str:
        return "Kubernetes API (kmock), watched; a standby replica (another one holds the Lease)"

    def close(self) -> None:
        self._run(self.cluster.down())
        self._run(self._emulator.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)


def live(n: int, edits: int, poll_s: float, source_kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp_name, EchoBackend() as backend:
        tmp = Path(tmp_name)
        (tmp / "extsvc.yaml").write_text(EXTSVC_CONFIG)
        docs = documents(n)
        routes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HTTPRoute"}
        source: FolderInput | KubeInput = (
            FolderInput(tmp, docs, poll_s) if source_kind == "folder" else KubeInput(tmp, docs)
        )
        with ExtsvcProcess(tmp / "extsvc.yaml") as extsvc:
            listen, xds, admin = free_port(), free_port(), free_port()
            endpoints = tmp / "endpoints.yaml"
            endpoints.write_text(
                f"services:\n  demo/extsvc: 127.0.0.1:{extsvc.grpc_port}\n"
                f"  demo/backend: 127.0.0.1:{backend.port}\nlisteners:\n  '80': 127.0.0.1:{listen}\n"
            )
            controller = subprocess.Popen([
                sys.executable, "-m", "extsvc_controller", "run", *source.args(),
                "--endpoints", str(endpoints), "--xds-address", f"127.0.0.1:{xds}",
                "--admin-address", f"127.0.0.1:{admin}",
                "--log-level", os.environ.get("BENCH_LOG", "warning"),
            ])
            try:
                began = time.monotonic()
                while not _ready(admin):
                    if time.monotonic() - began > 120:
                        raise RuntimeError("the controller was not ready in 120 s")
                    time.sleep(0.1)
                ready_s = time.monotonic() - began
                boot = tmp / "envoy.yaml"
                subprocess.run([
                    sys.executable, "-m", "extsvc_controller", "render", "--xds", f"127.0.0.1:{xds}",
                    "--gateway", "demo/gw", "--admin", f"127.0.0.1:{free_port()}", "-o", str(boot),
                ], check=True)
                proxy = EnvoyProcess(boot.read_text())
                proxy.port = listen
                with proxy, httpx.Client(base_url=proxy.url("")) as client:
                    loaded_rss = rss_mb(controller.pid)
                    delays: list[float] = []
                    api_s: list[float] = []  # how long the edit itself took (write, or PATCH)
                    for k in range(edits):
                        name = f"r{(k * 37) % n}"
                        marker = f"m{k}"
                        host = routes[name]["spec"]["hostnames"][0]
                        written = time.perf_counter()
                        source.edit(edited(routes[name], marker))
                        api_s.append(time.perf_counter() - written)
                        while True:
                            client.get(f"/{name}/a", headers={"host": host})
                            if backend.requests and backend.requests[-1].headers.get("x-edit") == marker:
                                break
                            if time.perf_counter() - written > 30:
                                raise RuntimeError(f"edit {k} not applied in 30 s")
                            time.sleep(0.02)  # each request runs ext_authz, ext_proc and a rate limit
                        delays.append(time.perf_counter() - written)
                        if os.environ.get("BENCH_TRACE"):
                            print(f"edit {k}: written {time.time() - delays[-1]:.3f} seen {time.time():.3f}")
                    final_rss, peak_rss = rss_mb(controller.pid)
            finally:
                controller.terminate()
                controller.wait(10)
                source.close()
    delays.sort()
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    print(f"live, {edits} edits, source: {source.describe()} (controller ready in {ready_s:.1f} s)")
    print(f"  change -> Envoy applied: p50 {statistics.median(delays) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms (target p99 < 1 s)")
    print(f"  of which the edit itself (file write, or the API's answer to the PATCH): "
          f"p50 {statistics.median(api_s) * 1000:.0f} ms, max {max(api_s) * 1000:.0f} ms")
    print(f"  controller RSS: {loaded_rss[0]:.0f} MB loaded, {final_rss:.0f} MB after the edits, "
          f"peak {peak_rss:.0f} MB (target < 200 MB)")


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--source", choices=["folder", "kube", "both"], default="both",
                        help="what the live controller watches (default: both, one after the other)")
    parser.add_argument("--no-live", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    in_process(args.routes, args.repeat)
    if not args.no_live:
        for kind in ("folder", "kube") if args.source == "both" else (args.source,):
            live(args.routes, args.edits, args.poll_interval, kind)


if __name__ == "__main__":
    main()
