"""The real ``extsvc`` command in subprocesses: SIGTERM, ``--workers``, ``validate``, ``plugins list``."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extsvc.testing import check_request

from .conftest import Proc, parse_metrics, run_cli, series

# A third-party plugin made visible to a subprocess the way an installed one is: a module and a
# *.dist-info with an `extsvc` entry point, on the subprocess's PYTHONPATH (the shared venv is
# left alone).
NAP_MODULE = '''
import asyncio

from pydantic import BaseModel

from extsvc import AuthorizerType, Decision, hookimpl


class NapConfig(BaseModel, frozen=True, extra="forbid"):
    seconds: float = 1.0


class Nap:
    def __init__(self, config, ctx):
        self._seconds = config.seconds
        self._log = ctx.logger

    async def check(self, request, /):
        self._log.warning("nap: sleeping [request_id=%s]", request.request_id)
        await asyncio.sleep(self._seconds)
        return Decision.allow(upstream_set={"x-napped": "yes"})


@hookimpl
def extsvc_register_authorizers():
    yield AuthorizerType(name="nap", config_model=NapConfig, factory=Nap, description="sleeps")
'''

CREDENTIALS = {"authorization": "Bearer s3cr3t-token", "cookie": "sid=s3cr3t-cookie"}


@pytest.fixture(scope="module")
def nap_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that makes the ``nap`` plugin importable by a subprocess."""
    site = tmp_path_factory.mktemp("site")
    (site / "extsvc_nap.py").write_text(NAP_MODULE)
    dist = site / "extsvc_nap-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extsvc-nap\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[extsvc]\nnap = extsvc_nap\n")
    return {"PYTHONPATH": str(site)}


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def authz(channel: grpc.Channel) -> Any:
    return external_auth_pb2_grpc.AuthorizationStub(channel)


def test_sigterm_lets_the_in_flight_check_finish_then_exits_0(
    spawn: Callable[..., Proc], nap_plugin: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text("default_policy: p\npolicies:\n  p:\n    steps: [{plugin: nap}]\n")
    proc = spawn(
        "--config", str(config), "--grace-period", "5", "--log-format", "json",
        "--log-level", "DEBUG", "--drain-delay", "0", env=nap_plugin,
    )
    proc.wait_ready()
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        request = check_request(headers=CREDENTIALS, request_id="rid-in-flight")
        in_flight = authz(channel).Check.future(request, timeout=10)
        proc.wait_log("nap: sleeping")
        proc.popen.send_signal(signal.SIGTERM)
        response = in_flight.result()
    assert response.status.code == 0
    assert [(h.header.key, h.header.value) for h in response.ok_response.headers] == [
        ("x-napped", "yes")
    ]
    assert proc.popen.wait(10) == 0

    lines = json_lines(proc.log)
    # stdout carries the decision log's records, stderr the log: both JSON lines
    entries = [e for e in lines if e.get("kind") != "decision"]
    decisions = [e for e in lines if e.get("kind") == "decision"]
    messages = [e["message"] for e in entries]
    assert any(m.startswith("signal received: draining") for m in messages)
    assert messages[-1] == "stopped"
    # the in-flight Check's decision was written before the process exited
    assert [(d["request_id"], d["outcome"]) for d in decisions] == [("rid-in-flight", "allow")]
    # Logs are JSON lines carrying the x-request-id as a field, and no credential.
    assert any(e.get("request_id") == "rid-in-flight" for e in entries)
    assert "s3cr3t" not in proc.log


def test_sighup_reloads_at_once_and_an_idle_server_stops_promptly(
    spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text("default_policy: p\npolicies:\n  p:\n    steps: [{plugin: allow}]\n")
    proc = spawn("--config", str(config), "--reload-interval", "60", "--drain-delay", "0")
    proc.wait_ready()
    config.write_text("default_policy: q\npolicies:\n  q:\n    steps: [{plugin: deny}]\n")
    proc.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proc.admin("/status").json()["generation"] != 2:
        assert time.monotonic() < deadline, proc.log
        time.sleep(0.05)
    assert proc.admin("/status").json()["policies"] == ["q"]

    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(10) == 0
    assert time.monotonic() - started < 3  # nothing in flight: no waiting out the grace period


@pytest.mark.parametrize(("workers", "code"), [("1", 2), ("2", 1)])
def test_a_busy_port_fails_start_up_without_restarts(
    spawn: Callable[..., Proc], workers: str, code: int
) -> None:
    # Exit 2 means "cannot start": --workers stops instead of restarting the worker forever.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn("--grpc-address", f"127.0.0.1:{port}", "--workers", workers)
        assert proc.popen.wait(15) == code
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in proc.log
    assert "Traceback" not in proc.log


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [((), {}, "uvloop"),
     (("--event-loop", "asyncio"), {}, "asyncio"),
     ((), {"EXTSVC_EVENT_LOOP": "asyncio"}, "asyncio"),
     (("--event-loop", "uvloop"), {"EXTSVC_EVENT_LOOP": "asyncio"}, "uvloop")],
)
def test_serve_runs_on_uvloop_unless_asked_otherwise(
    spawn: Callable[..., Proc], args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    proc = spawn(*args, "--drain-delay", "0", env=env)
    proc.wait_ready()
    assert proc.admin("/status").json()["event_loop"] == expected
    assert f"event loop {expected}" in proc.log
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request("/public/x"), timeout=5
        )
    assert answer.status.code == 0  # the embedded demo allows it: the loop serves
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(10) == 0


def test_an_unknown_event_loop_is_refused_naming_the_setting(spawn: Callable[..., Proc]) -> None:
    proc = spawn(env={"EXTSVC_EVENT_LOOP": "trio"})
    assert proc.popen.wait(15) == 2
    assert "invalid settings" in proc.log and "event_loop" in proc.log


def test_two_workers_share_the_port_all_answer_and_all_exit_0_on_sigterm(
    spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    config = tmp_path / "extsvc.yaml"
    config.write_text("default_policy: p\npolicies:\n  p:\n    steps: [{plugin: allow}]\n")
    proc = spawn(
        "--workers", "2", "--config", str(config), "--log-format", "json", "--log-level", "DEBUG",
        "--drain-delay", "0",
    )
    # The admin port is shared too: new connections reach either worker.
    workers: set[int] = set()
    deadline = time.monotonic() + 20
    while len(workers) < 2:
        assert time.monotonic() < deadline, f"not two ready workers: {workers}\n{proc.log}"
        assert proc.popen.poll() is None, proc.log
        try:
            status = proc.admin("/status").json()
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if status["ready"]:
            workers.add(status["pid"])
    assert proc.popen.pid not in workers

    sent = 40
    for index in range(sent):
        # A local subchannel pool gives each channel its own connection, so the kernel spreads
        # them over the workers.
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}", options) as channel:
            response = authz(channel).Check(check_request(request_id=f"rid-w{index}"), timeout=5)
            assert response.status.code == 0
    answered = {
        e["pid"] for e in json_lines(proc.log)
        if str(e.get("request_id", "")).startswith("rid-w") and e.get("kind") != "decision"
    }
    assert answered == workers

    # Either worker's /metrics counts the decisions of both: its own at once, the other's once
    # that worker flushed its request-path counters (Metrics.FLUSH_INTERVAL_S, 1 s).
    allowed = series("extsvc_authz_decisions_total", policy="p", decision="allow")
    counted = 0.0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        counted = parse_metrics(proc.admin("/metrics").text).get(allowed, 0.0)
        if counted >= sent:
            break
        time.sleep(0.2)
    assert counted == sent

    os.kill(proc.popen.pid, signal.SIGTERM)
    assert proc.popen.wait(15) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_validate_names_the_offending_field_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "policies:\n  p:\n    steps: [{plugin: deny, config: {status: 99}}, {plugin: nope}]\n"
    )
    result = run_cli("validate", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "2 problem(s)" in result.stderr
    assert "policies.p.steps[0].config.status" in result.stderr
    assert "policies.p.steps[1].plugin: unknown plugin kind 'nope'" in result.stderr

    good = tmp_path / "good.yaml"
    good.write_text("default_policy: p\npolicies:\n  p:\n    steps: [{plugin: allow}]\n")
    result = run_cli("validate", str(good))
    assert result.returncode == 0, result.stderr
    assert f"{good}: OK\n  ext_authz: 1 policies: p; default: p\n" in result.stdout


def test_plugins_list_shows_the_example_plugin_from_its_entry_point() -> None:
    result = run_cli("plugins", "list")
    assert result.returncode == 0, result.stderr
    acme = next(line for line in result.stdout.splitlines() if line.startswith("acme "))
    assert "entry point (acme-extsvc 1.0.0)" in acme
    assert "tenant-header" in acme

    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--json").stdout)}
    assert listed["acme"]["kinds"] == ["tenant-header"]
    assert listed["acme"]["location"].endswith("acme_extsvc/plugin.py")
    assert listed["deny"]["source"] == "builtin"
