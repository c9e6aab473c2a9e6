"""Traffic insights through a real Envoy: traces that continue Envoy's into extsvc's spans, and
the live decision stream read by ``extsvc tail`` / ``extsvc top``.

Envoy (docs/envoy/traced.yaml, the example of docs/observability.md) runs ext_authz -> ext_proc
-> ratelimit -> router against one ``extsvc serve``, and its OpenTelemetry tracer exports to the
test's OTLP collector, as does extsvc (``tracing_endpoint``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from extsvc.testing.harness import EnvoyProcess, ExtsvcProcess, json_lines, wait_until
from extsvc.testing.otlp import OtlpCollector, ReceivedSpan

from .conftest import StartEnvoy

HERE = Path(__file__).resolve().parent / "insights"
ENVOY = Path(__file__).resolve().parents[2] / "docs" / "envoy" / "traced.yaml"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
SERVER, CLIENT = 2, 3


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as c:
        yield c


@pytest.fixture(scope="module")
def extsvc(collector: OtlpCollector) -> Iterator[ExtsvcProcess]:
    env = {"EXTSVC_TRACING_ENDPOINT": collector.endpoint, "EXTSVC_DECISION_LOG": "all"}
    with ExtsvcProcess(HERE / "policies.yaml", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def envoy(start_envoy: StartEnvoy, extsvc: ExtsvcProcess, collector: OtlpCollector) -> EnvoyProcess:
    return start_envoy(ENVOY, extsvc.grpc_port, p4317=collector.port)


def send(envoy: EnvoyProcess, path: str, headers: dict[str, str], body: bytes | None = None) -> int:
    request = urllib.request.Request(envoy.url(path), data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _by_name(spans: list[ReceivedSpan], name: str, service: str = "extsvc") -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name and s.service == service]


def test_a_trace_from_the_client_continues_through_envoy_into_extsvc_steps(
    envoy: EnvoyProcess, collector: OtlpCollector
) -> None:
    collector.clear()
    headers = {"x-user": "alice", "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}
    assert send(envoy, "/limited/one", headers) == 200

    def complete(spans: list[ReceivedSpan]) -> bool:
        ours = {s.name for s in spans if s.trace_id == TRACE_ID and s.service == "extsvc"}
        theirs = {s.name for s in spans if s.trace_id == TRACE_ID and s.service == "envoy-gw"}
        return len(ours) >= 7 and "ingress" in theirs and len(theirs) >= 4

    spans = [s for s in collector.wait_for(complete) if s.trace_id == TRACE_ID]
    by_id = {s.span_id: s for s in spans}
    ingress = _by_name(spans, "ingress", "envoy-gw")[0]
    assert ingress.parent_span_id == CLIENT_SPAN

    # Each RPC's SERVER span is a child of Envoy's CLIENT (egress) span for that call.
    for service, method in (
        ("envoy.service.auth.v3.Authorization", "Check"),
        ("envoy.service.ext_proc.v3.ExternalProcessor", "Process"),
        ("envoy.service.ratelimit.v3.RateLimitService", "ShouldRateLimit"),
    ):
        (rpc,) = _by_name(spans, f"{service}/{method}")
        assert rpc.kind == SERVER
        egress = by_id[rpc.parent_span_id]
        assert egress.service == "envoy-gw" and egress.kind == CLIENT
        assert egress.name == f"async {service}.{method} egress"
        assert egress.parent_span_id == ingress.span_id
        assert rpc.attributes["rpc.system"] == "grpc"
        assert rpc.attributes["rpc.service"] == service
        assert rpc.attributes["rpc.method"] == method
        assert rpc.attributes["rpc.grpc.status_code"] == 0

    # ext_authz: the policy's two steps beneath the Check span, in order, with their outcomes.
    (check,) = _by_name(spans, "envoy.service.auth.v3.Authorization/Check")
    assert check.attributes["extsvc.policy"] == "members"
    assert check.attributes["extsvc.decision"] == "allow"
    steps = sorted((s for s in spans if s.parent_span_id == check.span_id), key=lambda s: s.start_ns)
    assert [(s.name, s.attributes["extsvc.step.kind"], s.attributes["extsvc.step.outcome"])
            for s in steps] == [
        ("step need-user", "header-match", "abstain"), ("step no-admin", "header-match", "allow"),
    ]
    assert all(check.start_ns <= s.start_ns <= s.end_ns <= check.end_ns for s in steps)

    # ext_proc: a span per phase with the processors beneath it.
    (process,) = _by_name(spans, "envoy.service.ext_proc.v3.ExternalProcessor/Process")
    phases = {s.name: s for s in spans if s.parent_span_id == process.span_id}
    assert set(phases) == {"ext_proc request_headers"}
    processors = [s for s in spans if s.parent_span_id == phases["ext_proc request_headers"].span_id]
    assert sorted(s.name for s in processors) == ["step size", "step stamp"]
    assert process.attributes["extsvc.policy"] == "stamp"

    # rate limit: domain and outcome, descriptor keys but not their values (the user's name).
    (rls,) = _by_name(spans, "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
    assert rls.attributes["extsvc.ratelimit.domain"] == "insights"
    assert rls.attributes["extsvc.ratelimit.outcome"] == "ok"
    assert rls.attributes["extsvc.ratelimit.descriptors"] == "generic_key,user"
    assert "alice" not in json.dumps([s.attributes for s in spans if s.service == "extsvc"])


def test_without_a_client_trace_envoy_starts_one_and_extsvc_joins_it(
    envoy: EnvoyProcess, collector: OtlpCollector
) -> None:
    collector.clear()
    assert send(envoy, "/admin/x", {"x-user": "carol"}) == 403

    def complete(spans: list[ReceivedSpan]) -> bool:
        return any(s.name.endswith("/Check") and s.service == "extsvc" for s in spans) and any(
            s.name == "ingress" for s in spans)

    spans = collector.wait_for(complete)
    (check,) = [s for s in spans if s.name.endswith("/Check") and s.service == "extsvc"]
    (ingress,) = [s for s in spans if s.name == "ingress" and s.trace_id == check.trace_id]
    assert ingress.parent_span_id == ""  # the trace started in Envoy
    assert check.attributes["extsvc.decision"] == "deny"
    assert check.attributes["extsvc.status"] == 403
    assert check.attributes["extsvc.step"] == "no-admin"


def _tail(extsvc: ExtsvcProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "extsvc", "tail", "--admin", f"127.0.0.1:{extsvc.admin_port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_extsvc_tail_follows_the_decisions_of_a_live_server_behind_envoy(
    envoy: EnvoyProcess, extsvc: ExtsvcProcess
) -> None:
    tail = _tail(extsvc, "--follow", "--last", "0", "--json", "--outcome", "deny",
                 "--outcome", "over_limit", "--outcome", "immediate")
    try:
        wait_until(lambda: extsvc.metric("extsvc_decision_stream_readers") >= 1, 10,
                   "the tail reader to attach")
        assert send(envoy, "/nobody", {}) == 401
        assert send(envoy, "/admin/panel", {"x-user": "dave"}) == 403
        codes = [send(envoy, "/limited/x", {"x-user": "bob"}) for _ in range(3)]
        assert codes == [200, 200, 429]
        assert send(envoy, "/upload", {"x-user": "erin", "content-type": "text/plain"},
                    b"x" * 100) == 413
        assert send(envoy, "/fine", {"x-user": "erin"}) == 200  # an allow: filtered out
        assert tail.stdout is not None
        records = json_lines(tail.stdout, 4, timeout=10)
    finally:
        tail.terminate()
        tail.wait(5)
    by_outcome = {str(r["outcome"]) + ":" + str(r["status"]): r for r in records}
    assert set(by_outcome) == {"deny:401", "deny:403", "over_limit:429", "immediate:413"}

    denied = by_outcome["deny:401"]
    assert denied["service"] == "ext_authz" and denied["policy"] == "members"
    assert denied["step"] == "need-user" and denied["method"] == "GET"
    assert denied["path"] == "/nobody" and str(denied["authority"]).startswith("127.0.0.1:")
    assert len(str(denied["request_id"])) == 36  # the x-request-id Envoy generated
    assert len(str(denied["trace_id"])) == 32  # Envoy's trace (its tracer is on)
    assert str(denied["time"]).endswith("Z") and len(str(denied["time"])) == 24

    over = by_outcome["over_limit:429"]
    assert over["service"] == "ratelimit" and over["policy"] == "insights"
    assert over["step"] == "per-user"
    assert over["detail"] == {"descriptors": "generic_key,user"}  # keys, not "bob"

    immediate = by_outcome["immediate:413"]
    assert immediate["service"] == "ext_proc" and immediate["policy"] == "stamp"
    assert immediate["step"] == "size" and immediate["path"] == "/upload"
    assert immediate["method"] == "POST"

    # The same records went to stdout as JSON lines (the server's log file holds both streams).
    def logged() -> set[object]:
        lines = extsvc.log().splitlines()
        return {json.loads(line)["request_id"] for line in lines if '"kind":"decision"' in line}

    wait_until(lambda: {r["request_id"] for r in records} <= logged(), 5, "the stdout records")


def test_extsvc_tail_prints_recent_decisions_and_top_summarises_them(
    envoy: EnvoyProcess, extsvc: ExtsvcProcess
) -> None:
    for _ in range(3):
        assert send(envoy, "/summary", {"x-user": "frank"}) == 200
    tail = _tail(extsvc, "--last", "2", "--service", "ext_authz", "--path-prefix", "/summary",
                 "--color", "always")
    out, err = tail.communicate(timeout=15)
    assert tail.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(" ext_authz members \033[32mALLOW\033[0m " in line for line in lines)
    assert all("GET 127.0.0.1:" in line and "/summary" in line for line in lines)

    top = subprocess.Popen(
        [sys.executable, "-m", "extsvc", "top", "--admin", f"127.0.0.1:{extsvc.admin_port}",
         "--interval", "3", "--iterations", "1", "--window", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # top counts what arrives while it runs
    wait_until(lambda: extsvc.metric("extsvc_decision_stream_readers") >= 1, 10, "top to attach")
    codes = [send(envoy, "/top", {"x-user": "gina"}) for _ in range(4)]
    codes.append(send(envoy, "/admin/top", {"x-user": "gina"}))
    assert codes == [200, 200, 200, 200, 403]
    out, err = top.communicate(timeout=30)
    assert top.returncode == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["SERVICE", "POLICY", "RATE/S"]
    members = [r.split() for r in rows if r.split()[:2] == ["ext_authz", "members"]]
    assert members, out
    _, _, _, denied, p50, p99, count = members[0]
    assert (int(count), denied) == (5, "20.0%")
    assert 0 < float(p50) <= float(p99)
