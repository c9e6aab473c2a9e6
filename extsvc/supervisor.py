"""``--workers N``: N server processes sharing one port (SO_REUSEPORT), the way to use N cores.

The kernel spreads new connections over the workers. The parent only starts them, forwards
SIGTERM/SIGINT/SIGHUP, restarts a worker that dies unexpectedly, and exits 0 once all have
stopped after a signal. Metrics are aggregated over workers via PROMETHEUS_MULTIPROC_DIR, so any
worker's ``/metrics`` answers for all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

log = logging.getLogger(__name__)

WORKER_ENV = "EXTSVC_WORKER_INDEX"
#: Exit code of ``extsvc serve`` when it cannot start (bad settings, plugin, port).
STARTUP_FAILED = 2
_RESTART_BACKOFF_S = 1.0


def supervise(argv: list[str], workers: int) -> int:
    """Run ``extsvc serve <argv>`` in ``workers`` child processes until a stop signal."""
    multiproc_dir = tempfile.mkdtemp(prefix="extsvc-metrics-")
    # the workers' admin API sockets: one WatchDecisions call can merge every worker's stream
    run_dir = tempfile.mkdtemp(prefix="extsvc-run-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=multiproc_dir, EXTSVC_RUN_DIR=run_dir)
    stopping = False

    def spawn(index: int) -> subprocess.Popen[bytes]:
        child_env = dict(env, **{WORKER_ENV: str(index)})
        return subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "extsvc", "serve", *argv, "--workers", "1", "--reuse-port"],
            env=child_env,
        )

    children = {i: spawn(i) for i in range(workers)}
    log.info("started %d workers: %s", workers, ", ".join(str(c.pid) for c in children.values()))

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    failed = False
    while children:
        time.sleep(0.2)
        for index, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            if stopping:
                del children[index]
                failed = failed or code != 0
                continue
            if code == STARTUP_FAILED:  # restarting cannot fix a bad flag, plugin or port
                log.error("worker %d could not start; stopping all workers", index)
                stopping = True
                failed = True
                forward(signal.SIGTERM, None)
                continue
            log.error("worker %d (pid %d) exited with %s; restarting", index, child.pid, code)
            time.sleep(_RESTART_BACKOFF_S)
            children[index] = spawn(index)
    for folder in (multiproc_dir, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0
