"""The live decision stream of real ``extsvc serve`` processes: the admin token, ``--workers``
(one ``extsvc tail`` sees every worker's decisions), and the decision log switched off."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from extsvc.testing import authz_stub, check_request
from extsvc.testing.harness import json_lines

from .conftest import EXTSVC, Proc, clean_env, run_cli

ALLOW_ALL = "version: 1\ndefault_policy: open\npolicies:\n  open:\n    steps: [{plugin: allow}]\n"


def _config(tmp_path: Path) -> str:
    path = tmp_path / "extsvc.yaml"
    path.write_text(ALLOW_ALL)
    return str(path)


def _checks(proc: Proc, count: int, prefix: str) -> None:
    """``count`` Checks, each on a connection of its own (the kernel spreads connections over
    the workers sharing the port)."""
    for i in range(count):
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            authz_stub(channel).Check(check_request(f"/{prefix}/{i}", request_id=f"{prefix}-{i}"),
                                      timeout=5)


def test_the_admin_token_guards_the_stream(spawn: Callable[..., Proc], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  t0ken-for-tail\n")
    proc = spawn("--config", _config(tmp_path), env={"EXTSVC_ADMIN_TOKEN_FILE": str(token)})
    proc.wait_ready()
    _checks(proc, 2, "tok")
    admin = f"127.0.0.1:{proc.admin_port}"

    refused = run_cli("tail", "--admin", admin)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr and refused.stdout == ""
    wrong = tmp_path / "wrong"
    wrong.write_text("guess")
    assert "UNAUTHENTICATED" in run_cli("tail", "--admin", admin, "--token-file", str(wrong)).stderr

    missing = run_cli("tail", "--admin", admin, "--token-file", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "cannot read the admin token" in missing.stderr

    allowed = run_cli("tail", "--admin", admin, "--token-file", str(token), "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert [json.loads(line)["request_id"] for line in allowed.stdout.splitlines()] == [
        "tok-0", "tok-1"
    ]
    assert proc.admin("/readyz").status_code == 200  # HTTP on the same port needs no token


def test_one_tail_follows_every_worker(spawn: Callable[..., Proc], tmp_path: Path) -> None:
    proc = spawn("--config", _config(tmp_path), "--workers", "2")
    proc.wait_ready()
    # both workers up: each answers /readyz on the shared admin port, and both sockets exist
    time.sleep(1.0)
    follower = subprocess.Popen(
        [str(EXTSVC), "tail", "--admin", f"127.0.0.1:{proc.admin_port}", "--follow",
         "--last", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )
    try:
        time.sleep(1.5)  # attached (to one worker, which reads the other's socket)
        _checks(proc, 40, "live")
        assert follower.stdout is not None
        seen = json_lines(follower.stdout, 40, timeout=15)
    finally:
        follower.terminate()
        follower.wait(5)
    assert sorted(str(r["request_id"]) for r in seen) == sorted(f"live-{i}" for i in range(40))
    assert {r["worker"] for r in seen} == {0, 1}, "40 connections all went to one worker"

    # without --follow: the recent decisions of both workers, oldest first
    recent = run_cli("tail", "--admin", f"127.0.0.1:{proc.admin_port}", "--json", "--last", "100")
    records = [json.loads(line) for line in recent.stdout.splitlines()]
    assert {r["worker"] for r in records} == {0, 1}
    assert len(records) == 40
    times = [r["time"] for r in records]
    assert times == sorted(times)
    # following with --last N: the N most recent of all workers first, merged in time order
    follower = subprocess.Popen(
        [str(EXTSVC), "tail", "--admin", f"127.0.0.1:{proc.admin_port}", "-f", "--last", "5",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )
    try:
        assert follower.stdout is not None
        first = json_lines(follower.stdout, 5, timeout=15)
    finally:
        follower.terminate()
        follower.wait(5)
    assert [r["request_id"] for r in first] == [r["request_id"] for r in records[-5:]]
    # --this-worker: only the worker the connection reached
    one = run_cli("tail", "--admin", f"127.0.0.1:{proc.admin_port}", "--json", "--last", "100",
                  "--this-worker")
    assert len({json.loads(line)["worker"] for line in one.stdout.splitlines()}) == 1


def test_with_the_decision_log_off_tail_says_so(spawn: Callable[..., Proc], tmp_path: Path) -> None:
    proc = spawn("--config", _config(tmp_path), env={"EXTSVC_DECISION_LOG": "off"})
    proc.wait_ready()
    _checks(proc, 1, "off")
    result = run_cli("tail", "--admin", f"127.0.0.1:{proc.admin_port}")
    assert result.returncode == 1
    assert "FAILED_PRECONDITION" in result.stderr and "decision_log: off" in result.stderr
    assert '"kind":"decision"' not in proc.log


def test_tail_reports_a_server_it_cannot_reach(tmp_path: Path) -> None:
    from extsvc.testing.harness import free_port

    result = run_cli("tail", "--admin", f"127.0.0.1:{free_port()}", timeout=30)
    assert result.returncode == 1
    assert "cannot reach the admin API" in result.stderr
