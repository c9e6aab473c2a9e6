"""Envoy + wrk end to end: the same Envoy config in front of the floor servicer and of extsvc.

Envoy answers every request itself with a direct_response, after ext_authz, so the backend is not
what is measured: the difference between the two runs is the authorization server. Used by
``authz_bench.py --envoy``; rounds alternate between the two Envoys.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from extsvc.testing.harness import EnvoyProcess, free_port, with_ports

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

ENVOY_CONFIG = (ROOT / "bench" / "envoy-bench.yaml").read_text(encoding="utf-8")


def wrk(url: str, headers: dict[str, str], seconds: float, connections: int) -> dict[str, float]:
    """One wrk run: requests/s, p50/p99 ms, and non-2xx replies."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True,
                         timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def pct(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non2xx": float(non2xx.group(1)) if non2xx else 0.0}


def run_envoy_case(fx: Any, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    from benchkit import wait_port, wait_ready

    floor_port, ext_port, admin_port = free_port(), free_port(), free_port()
    floor = subprocess.Popen([PY, str(ROOT / "bench" / "floor_server.py"), str(floor_port)])
    ext = subprocess.Popen(
        [PY, "-m", "extsvc", "serve", "--config", str(config),
         "--grpc-address", f"127.0.0.1:{ext_port}", "--admin-address", f"127.0.0.1:{admin_port}",
         "--log-level", "WARNING"],
        cwd=fx.workdir,
    )
    envoys: list[EnvoyProcess] = []
    try:
        wait_port(floor_port)
        wait_ready(admin_port)
        for port in (floor_port, ext_port):
            text = with_ports(ENVOY_CONFIG, {10000: free_port(), 9901: free_port(), 9001: port})
            envoys.append(EnvoyProcess(text).start())
        headers = {"authorization": f"Bearer {fx.token}", "x-api-key": fx.api_key}
        seconds = max(2.0, args.seconds)
        for envoy in envoys:  # warm-up
            wrk(envoy.url("/api/orders?id=7"), headers, 2, args.connections)
        floor_runs, ext_runs = [], []
        for _ in range(args.rounds):
            floor_runs.append(wrk(envoys[0].url("/api/orders?id=7"), headers, seconds,
                                  args.connections))
            ext_runs.append(wrk(envoys[1].url("/api/orders?id=7"), headers, seconds,
                                args.connections))
    finally:
        for envoy in envoys:
            envoy.stop()
        for proc in (floor, ext):
            proc.terminate()
            proc.wait(timeout=15)
    ratios = [e["rps"] / f["rps"] for e, f in zip(ext_runs, floor_runs, strict=True)]

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows = ["| case | server | req/s | p50 ms | p99 ms | non-2xx | ratio vs floor |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in (("envoy+floor", floor_runs), ("envoy+extsvc", ext_runs)):
        ratio = f"**{statistics.median(ratios):.2f}**" if name == "envoy+extsvc" else ""
        rows.append(f"| envoy jwt-warm (wrk) | {name} | {med(runs, 'rps'):,.0f} | "
                    f"{med(runs, 'p50_ms'):.2f} | {med(runs, 'p99_ms'):.2f} | "
                    f"{sum(r['non2xx'] for r in runs):.0f} | {ratio} |")
    return {"case": "envoy-jwt-warm", "floor": floor_runs, "extsvc": ext_runs,
            "ratio": statistics.median(ratios), "ratios": ratios, "table": "\n".join(rows)}
