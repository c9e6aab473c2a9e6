"""The benchmarks still run: each one, tiny, once (the figures are not checked, only the shape).

Benchmarks are not timed tests (docs/performance.md); this keeps the scripts from rotting between
the runs that measure.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=240,
        cwd=BENCH,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def ratio_of(out: str, case: str) -> float:
    match = re.search(rf"^\| {case} \| extsvc \|.*\*\*([0-9.]+)\*\*", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


@pytest.mark.slow
def test_authz_bench() -> None:
    out = run("authz_bench.py", "--requests", "300", "--rounds", "1", "--case", "allow-all")
    assert ratio_of(out, "allow-all") > 0
    assert "pinned" in out  # says how the CPUs were used


@pytest.mark.slow
@pytest.mark.redis
def test_ratelimit_bench() -> None:
    out = run("ratelimit_bench.py", "--requests", "300", "--rounds", "1")
    assert ratio_of(out, "memory") > 0 and ratio_of(out, "redis") > 0
    assert re.search(r"^\| redis \| extsvc \|.*\| 1\.000 \|", out, re.MULTILINE), out


@pytest.mark.slow
def test_extproc_bench() -> None:
    out = run("extproc_bench.py", "--requests", "100", "--rounds", "1", "--case", "override")
    assert ratio_of(out, "override") > 0
    assert re.search(r"^\| override \| extsvc \| [0-9,]+ \|[^|]+\|[^|]+\| 1\.0 \|", out, re.MULTILINE), out


@pytest.mark.slow
@pytest.mark.redis
def test_soak() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--seconds", "8", "--clients", "1",
         "--redis-every", "3", "--jwks-every", "4", "--reload-every", "2"],
        capture_output=True, text=True, timeout=120, cwd=BENCH,
    )
    out = done.stdout
    assert "| ext_authz |" in out and "| ratelimit |" in out and "| ext_proc |" in out, done.stderr
    assert "RSS (MiB): start" in out
    assert "redis restarts" in out and "jwks flaps" in out and "reloads (broken)" in out
    # timing failures may happen on a loaded machine; these never may
    assert "was allowed" not in out and "not redacted" not in out


@pytest.mark.slow
def test_insights_bench() -> None:
    out = run("insights_bench.py", "--requests", "300", "--rounds", "1", "--path", "authz",
              "--case", "baseline", "--case", "stream", "--case", "tracing-100", "--settle", "0.2")
    assert re.search(r"^\| stream \| [0-9,]+ \|.*\*\*[0-9.]+\*\*", out, re.MULTILINE), out
    # the collector got the spans of every measured Check: one per RPC and one per step
    match = re.search(r"tracing-100 authz: ([0-9,]+) measured RPCs; .*received/expected ([0-9.]+)",
                      out)
    assert match and float(match.group(2)) > 0.9, out
    assert "dropped (slow reader) 0" in out
