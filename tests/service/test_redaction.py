"""No credential reaches any log line or decision record, at any log level.

A real ``extsvc serve`` at DEBUG, JSON logs, every decision recorded (``decision_log: all``)
with the credential headers named in ``decision_log_headers``, gets requests of all three
services that carry a bearer token, API keys (a known and an unknown one), a password (basic
auth, a header named in ``redact_headers``, a query string) and a rate-limit descriptor made
from the API key. Its whole output (stdout: decision records, stderr: log) is then searched for
each secret, raw and base64-encoded.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extsvc.testing import authz_stub, check_request
from extsvc.testing.extproc import DEFAULT_REQUEST_HEADERS, headers_message

from .conftest import Proc

TOKEN = "tok-s3cr3t-4f1e9a"
API_KEY = "key-s3cr3t-live-77a1"
WRONG_KEY = "key-s3cr3t-wrong-0b2c"
PASSWORD = "pa55-s3cr3t-9d3"
BASIC = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
SECRETS = {
    "bearer token": TOKEN, "api key": API_KEY, "unknown api key": WRONG_KEY,
    "password": PASSWORD, "basic credentials": BASIC,
    "api key, base64": base64.b64encode(API_KEY.encode()).decode(),
}

POLICY = """\
version: 1
default_policy: keys
policies:
  keys:
    steps:
      - name: key
        plugin: api-key
        config:
          keys_file: keys.json
          sources: [{header: x-api-key}, {query: api_key}]
extproc:
  default_policy: stamp
  policies:
    stamp:
      processors:
        - plugin: headers
          config: {request: {set: {x-extproc: "on"}}}
ratelimit:
  config_dir: domains
"""
DOMAIN = """\
domain: keys
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1}
"""


def _serve(spawn: Callable[..., Proc], tmp_path: Path) -> Proc:
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{"key": API_KEY, "client_id": "job"}]}))
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "keys.yaml").write_text(DOMAIN)
    (tmp_path / "extsvc.yaml").write_text(POLICY)
    proc = spawn(
        "--config", str(tmp_path / "extsvc.yaml"), "--log-level", "DEBUG", "--log-format", "json",
        env={
            "EXTSVC_DECISION_LOG": "all",
            "EXTSVC_DECISION_LOG_HEADERS": "authorization,x-api-key,x-db-password,x-tenant",
            "EXTSVC_REDACT_HEADERS": "x-db-password",
        },
    )
    proc.wait_ready()
    return proc


def _traffic(proc: Proc) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        check = authz_stub(channel).Check
        base = {"x-tenant": "acme", "x-db-password": PASSWORD}
        answers = [
            check(check_request("/a", headers={**base, "x-api-key": API_KEY,
                                               "authorization": f"Bearer {TOKEN}"})),
            check(check_request("/b", headers={**base, "x-api-key": WRONG_KEY,
                                               "authorization": f"Basic {BASIC}"})),
            check(check_request(f"/c?api_key={API_KEY}&password={PASSWORD}", headers=base)),
        ]
        assert [a.status.code for a in answers] == [0, 16, 0]

        process = external_processor_pb2_grpc.ExternalProcessorStub(channel).Process
        headers = {**DEFAULT_REQUEST_HEADERS, **base, "x-api-key": API_KEY,
                   ":path": f"/d?token={TOKEN}", "authorization": f"Bearer {TOKEN}"}
        replies = list(process(iter([headers_message(headers)]), timeout=10))
        assert len(replies) == 1

        limit = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit
        request = rls_pb2.RateLimitRequest(domain="keys", descriptors=[
            ratelimit_pb2.RateLimitDescriptor(entries=[
                ratelimit_pb2.RateLimitDescriptor.Entry(key="api_key", value=API_KEY)
            ]),
        ])
        codes = [limit(request, timeout=5).overall_code for _ in range(2)]
        assert codes == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]


def test_no_secret_reaches_any_log_level_or_decision_record(
    spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    proc = _serve(spawn, tmp_path)
    _traffic(proc)
    proc.popen.terminate()
    assert proc.popen.wait(15) == 0
    output = proc.log

    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    records = [r for r in lines if r.get("kind") == "decision"]
    debug = [r for r in lines if r.get("level") == "DEBUG"]
    # What was searched is what a leak would be in: DEBUG request lines with their headers, and
    # a record per decision with the named headers.
    assert any("headers=" in r["message"] for r in debug)
    assert sorted((r["service"], r["outcome"]) for r in records) == [
        ("ext_authz", "allow"), ("ext_authz", "allow"), ("ext_authz", "deny"),
        ("ext_proc", "ok"), ("ratelimit", "ok"), ("ratelimit", "over_limit"),
    ]
    authz = [r for r in records if r["service"] == "ext_authz"]
    assert all(r["detail"]["x-tenant"] == "acme" for r in authz)  # a header not secret: kept
    assert all(r["detail"]["x-db-password"] == "<redacted>" for r in authz)  # redact_headers
    assert {r["detail"].get("authorization") for r in authz} == {"<redacted>", None}
    assert all(r["detail"].get("x-api-key") in ("<redacted>", None) for r in authz)
    assert {r["path"] for r in authz} == {"/a", "/b", "/c"}  # no query strings
    over = next(r for r in records if r["outcome"] == "over_limit")
    assert over["detail"]["descriptors"] == "api_key"  # the key, not its value

    leaks = {what: secret for what, secret in SECRETS.items() if secret in output}
    assert not leaks, f"secrets in the output: {sorted(leaks)}"
