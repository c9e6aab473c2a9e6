"""What every benchmark here needs: free ports, waiting for servers, CPU time, load tools.

The benchmarks run as scripts (``python bench/authz_bench.py``), so this module is imported as
``benchkit`` from the same directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from extsvc.testing.harness import free_port, http_get

__all__ = [
    "Sample", "add_loop_arguments", "add_pin_argument", "apply_loops", "apply_pinning",
    "cpu_seconds", "ensure_tools", "free_port", "h2load", "load_command", "median_sample",
    "server_command", "wait_port", "wait_ready",
]

#: (load generator CPUs, server CPUs) for ``taskset -c`` while pinning is on, else None
_pinning: tuple[str, str] | None = None


def add_pin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=True,
        help="run the load generator on the first CPU and the servers (and redis-server) on the "
             "others, so that they do not take CPU from each other (default: on with >= 2 CPUs)",
    )


def apply_pinning(enabled: bool) -> str:
    """Turn pinning on (when asked and there are 2+ CPUs); a line saying what was done."""
    global _pinning
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2 or shutil.which("taskset") is None:
        _pinning = None
        return "not pinned: load generator and servers share every CPU"
    _pinning = (str(cpus[0]), ",".join(str(c) for c in cpus[1:]))
    return f"pinned: load generator on CPU {_pinning[0]}, servers on CPU {_pinning[1]}"


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
        help="extsvc's event loop (its event_loop setting; default auto = uvloop)",
    )
    parser.add_argument(
        "--floor-loop", choices=("asyncio", "uvloop"), default="asyncio",
        help="the floor's event loop (default asyncio: a bare grpc.aio server as it comes)",
    )


def apply_loops(args: argparse.Namespace) -> str:
    """Hand the loop choices to the servers started from here (environment); a line saying so."""
    from floorkit import FLOOR_LOOP_ENV

    os.environ["EXTSVC_EVENT_LOOP"] = args.event_loop
    os.environ[FLOOR_LOOP_ENV] = args.floor_loop
    extsvc = "uvloop (auto)" if args.event_loop == "auto" else args.event_loop
    return f"event loops: extsvc {extsvc}, floor {args.floor_loop}"


def server_command(command: list[str]) -> list[str]:
    """``command`` run on the servers' CPUs when pinning is on."""
    return ["taskset", "-c", _pinning[1], *command] if _pinning else command


def load_command(command: list[str]) -> list[str]:
    """``command`` run on the load generator's CPU when pinning is on."""
    return ["taskset", "-c", _pinning[0], *command] if _pinning else command

_PACKAGES = {"h2load": "nghttp2-client", "wrk": "wrk"}


def ensure_tools(*tools: str) -> None:
    """Install missing load generators from Debian's packages (h2load, wrk)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"installing {', '.join(missing)} with apt-get", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", *(_PACKAGES[t] for t in missing)],
                       check=True, stdout=subprocess.DEVNULL)


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def wait_ready(admin_port: int, timeout: float = 20.0) -> None:
    """Until extsvc's ``/readyz`` on ``admin_port`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_get(f"http://127.0.0.1:{admin_port}/readyz", timeout=1)[0] == 200:
            return
        time.sleep(0.1)
    raise RuntimeError("extsvc did not become ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    """One h2load run against one server."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the server's CPU time per successful request
    failed: int
    requests: int


def h2load(
    port: int, path: str, frame_file: Path, pid: int, requests: int, clients: int, streams: int
) -> Sample:
    """Send ``requests`` unary gRPC calls (the pre-encoded frame in ``frame_file``) to ``path``."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        before = cpu_seconds(pid)
        out = subprocess.run(
            load_command([
                "h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams), "-t", "1",
                "-d", str(frame_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
                f"--log-file={log.name}", f"http://127.0.0.1:{port}{path}",
            ]),
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout
        cpu = cpu_seconds(pid) - before
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line]
    latencies = sorted(int(r[2]) for r in rows if r[1] == "200")
    rps = next(float(line.split()[3]) for line in out.splitlines() if line.startswith("finished in"))
    if not latencies:
        raise RuntimeError(f"no successful request:\n{out}")
    return Sample(
        rps=rps,
        p50_ms=latencies[len(latencies) // 2] / 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000,
        cpu_us=cpu / max(len(latencies), 1) * 1e6,
        failed=sum(1 for r in rows if r[1] != "200"),
        requests=len(rows),
    )


def median_sample(samples: list[Sample]) -> Sample:
    """The median of each column over rounds (failures and requests summed)."""
    return Sample(
        rps=statistics.median(s.rps for s in samples),
        p50_ms=statistics.median(s.p50_ms for s in samples),
        p99_ms=statistics.median(s.p99_ms for s in samples),
        cpu_us=statistics.median(s.cpu_us for s in samples),
        failed=sum(s.failed for s in samples),
        requests=sum(s.requests for s in samples),
    )
