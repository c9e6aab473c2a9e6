"""What every benchmark here needs: free ports, waiting for servers, CPU time, load tools.

The benchmarks run as scripts (``python bench/authz_bench.py``), so this module is imported as
``benchkit`` from the same directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from extsvc.testing.harness import free_port, http_get

__all__ = ["cpu_seconds", "ensure_tools", "free_port", "wait_port", "wait_ready"]

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
