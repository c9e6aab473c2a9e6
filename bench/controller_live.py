"""The live control plane at scale (1,000 HTTPRoutes + 1,000 TrafficPolicies, as controller_bench.py
generates them): how long one edit takes to rebuild, how long until Envoy applies it, and the
controller's memory.

1. In process: a full build (parse every manifest, translate, cut into xDS resources, hash them)
   against the rebuild after one edited route (its parse only, then the same steps), best of
   ``--repeat``. Targets: the rebuild < 200 ms.
2. Live: ``extsvc-controller run -f DIR`` (a separate process) feeds a real Envoy over ADS, in
   front of ``extsvc serve`` and an echo backend. ``--edits`` times, one route's file gets a new
   ``x-edit`` request header; the time from the write until a request through Envoy carries it is
   recorded (p50, p99). Target: p99 < 1 s. The file poll interval (``--poll-interval``) is part of
   that time; in Kubernetes mode a watch event replaces it.
3. The controller's RSS with that snapshot loaded, and its peak. Target < 200 MB.

    .venv/bin/python bench/controller_live.py [--routes 1000] [--edits 50] [--poll-interval 0.1]
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

from extsvc.testing.harness import EchoBackend, EnvoyProcess, ExtsvcProcess, free_port
from extsvc_controller.kube.wiring import ParseCache
from extsvc_controller.publish import split
from extsvc_controller.results import Options
from extsvc_controller.translate import translate
from extsvc_controller.xds.cache import XdsSnapshot

EXTSVC_CONFIG = """\
# every request allowed, ext_proc passes through, unknown rate-limit domains are OK
default_policy: allow
policies:
  allow: {steps: [{plugin: allow}]}
"""


def edited(doc: dict[str, Any], marker: str) -> dict[str, Any]:
    """The route with a RequestHeaderModifier that sets ``x-edit: <marker>`` on its first rule."""
    out = copy.deepcopy(doc)
    out["spec"]["rules"][0]["filters"] = [{
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "x-edit", "value": marker}]},
    }]
    return out


def build(cache: ParseCache, docs: list[dict[str, Any]], options: Options) -> float:
    began = time.perf_counter()
    snapshot = cache.snapshot(docs)
    translation = translate(snapshot, options)
    for res in split(translation).values():
        XdsSnapshot(res.messages())
    return time.perf_counter() - began


def in_process(n: int, repeat: int) -> None:
    docs = documents(n)
    options = Options(per_gateway=True, endpoints={"demo/backend": ("127.0.0.1", 1)})
    build(ParseCache(), documents(5), options)  # imports, validators
    full = edit = float("inf")
    for k in range(repeat):
        cache = ParseCache()
        full = min(full, build(cache, docs, options))
        changed = list(docs)
        index = next(i for i, d in enumerate(docs) if d["kind"] == "HTTPRoute")
        changed[index] = edited(docs[index], f"m{k}")
        edit = min(edit, build(cache, changed, options))
    print(f"{n} HTTPRoutes + {n} TrafficPolicies, in process (best of {repeat})")
    print(f"  full build (parse all, translate, xDS cut, hash): {full * 1000:7.0f} ms (baseline)")
    print(f"  one edited route, rebuilt:                       {edit * 1000:7.0f} ms "
          f"(target < 200 ms; {edit / full:.2f}x the full build)")


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def live(n: int, edits: int, poll_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp_name, EchoBackend() as backend:
        tmp = Path(tmp_name)
        (tmp / "extsvc.yaml").write_text(EXTSVC_CONFIG)
        with ExtsvcProcess(tmp / "extsvc.yaml") as extsvc:
            folder = tmp / "manifests"
            folder.mkdir()
            docs = documents(n)
            routes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HTTPRoute"}
            (folder / "base.yaml").write_text(yaml.safe_dump_all(
                [d for d in docs if d["kind"] not in ("HTTPRoute", "TrafficPolicy")]
            ))
            for d in docs:
                if d["kind"] in ("HTTPRoute", "TrafficPolicy"):
                    (folder / f"{d['kind']}-{d['metadata']['name']}.yaml").write_text(yaml.safe_dump(d))
            listen, xds, admin = free_port(), free_port(), free_port()
            endpoints = tmp / "endpoints.yaml"
            endpoints.write_text(
                f"services:\n  demo/extsvc: 127.0.0.1:{extsvc.grpc_port}\n"
                f"  demo/backend: 127.0.0.1:{backend.port}\nlisteners:\n  '80': 127.0.0.1:{listen}\n"
            )
            controller = subprocess.Popen([
                sys.executable, "-m", "extsvc_controller", "run", "-f", str(folder),
                "--endpoints", str(endpoints), "--xds-address", f"127.0.0.1:{xds}",
                "--admin-address", f"127.0.0.1:{admin}", "--poll-interval", str(poll_s),
                "--log-level", "warning",
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
                    delays = []
                    for k in range(edits):
                        name = f"r{(k * 37) % n}"
                        marker = f"m{k}"
                        path = folder / f"HTTPRoute-{name}.yaml"
                        host = routes[name]["spec"]["hostnames"][0]
                        written = time.perf_counter()
                        path.write_text(yaml.safe_dump(edited(routes[name], marker)))
                        while True:
                            client.get(f"/{name}/a", headers={"host": host})
                            if backend.requests and backend.requests[-1].headers.get("x-edit") == marker:
                                break
                            if time.perf_counter() - written > 30:
                                raise RuntimeError(f"edit {k} not applied in 30 s")
                            time.sleep(0.005)
                        delays.append(time.perf_counter() - written)
                    final_rss, peak_rss = rss_mb(controller.pid)
            finally:
                controller.terminate()
                controller.wait(10)
    delays.sort()
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    print(f"live, {edits} edits, file poll every {poll_s * 1000:.0f} ms "
          f"(controller ready in {ready_s:.1f} s, pid {os.getpid()})")
    print(f"  change -> Envoy applied: p50 {statistics.median(delays) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms (target p99 < 1 s)")
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
    parser.add_argument("--no-live", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    in_process(args.routes, args.repeat)
    if not args.no_live:
        live(args.routes, args.edits, args.poll_interval)


if __name__ == "__main__":
    main()
