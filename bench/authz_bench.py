"""ext_authz throughput: extsvc with a policy vs a bare grpc.aio servicer (the floor), same run.

Both servers are driven by h2load with the same pre-encoded gRPC CheckRequest; rounds alternate
between them so that machine noise hits both. Printed per case: requests/s, p50/p99 latency (from
h2load's per-request log), server CPU per RPC, and the extsvc/floor throughput ratio (median of
the rounds).

    .venv/bin/python bench/authz_bench.py                  # all gRPC cases
    .venv/bin/python bench/authz_bench.py --envoy          # plus Envoy+wrk end to end
    .venv/bin/python bench/authz_bench.py --requests 20000 --rounds 5 --case jwt-warm

Needs h2load (Debian nghttp2-client) and, for --envoy, wrk; installed with apt-get if missing.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import yaml
from benchkit import (
    Sample,
    add_loop_arguments,
    add_pin_argument,
    apply_loops,
    apply_pinning,
    ensure_tools,
    free_port,
    h2load,
    median_sample,
    server_command,
    wait_port,
    wait_ready,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.service.auth.v3 import external_auth_pb2

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"


@dataclass
class Fixture:
    workdir: Path
    token: str
    api_key: str


def make_fixture(workdir: Path) -> Fixture:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="bench-1", use="sig", alg="RS256")
    (workdir / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    now = int(time.time())
    token = jwt.encode(
        {"iss": "https://idp.bench", "aud": "bench", "sub": "user-42", "scope": "read write",
         "iat": now, "exp": now + 3600},
        pem, algorithm="RS256", headers={"kid": "bench-1"},
    )
    api_key = "bench-key-0000000000000000000000000"
    (workdir / "keys.txt").write_text(f"{api_key} bench-client bench-tenant\n")
    return Fixture(workdir, token, api_key)


def jwt_step(cache: bool) -> dict[str, object]:
    return {
        "plugin": "jwt",
        "config": {
            "providers": [{
                "name": "bench", "issuers": ["https://idp.bench"], "audiences": ["bench"],
                "algorithms": ["RS256"], "jwks_file": "jwks.json",
            }],
            "forward": {"headers": {"x-user": "sub"}, "metadata": {"user": "sub"}},
            "cache": {"enabled": cache},
        },
    }


CASES: dict[str, list[dict[str, object]]] = {
    "allow-all": [{"plugin": "allow"}],
    "jwt-warm": [jwt_step(cache=True)],
    "jwt-nocache": [jwt_step(cache=False)],
    "jwt-chain": [
        jwt_step(cache=True),
        {"plugin": "header-match",
         "config": {"match": {"methods": ["GET"], "path": {"prefix": "/api/"}},
                    "on_match": "abstain", "on_no_match": "deny"}},
        {"plugin": "api-key", "config": {"keys_file": "keys.txt"}},
    ],
}


def write_config(fx: Fixture, case: str) -> Path:
    combine = "all-must-allow" if case == "jwt-chain" else "first-decisive"
    config = {"default_policy": "bench",
              "policies": {"bench": {"combine": combine, "steps": CASES[case]}}}
    path = fx.workdir / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def request_frame(fx: Fixture) -> bytes:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", "/api/orders?id=7", "bench", "http"
    http.protocol = "HTTP/1.1"
    request.attributes.source.address.socket_address.address = "127.0.0.1"
    http.headers.update({
        ":authority": "bench", ":method": "GET", ":path": "/api/orders?id=7", ":scheme": "http",
        "authorization": f"Bearer {fx.token}", "x-api-key": fx.api_key,
        "user-agent": "h2load", "x-request-id": "bench",
    })
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def check_allowed(port: int, fx: Fixture) -> None:
    """Prove the policy really allows this request (so the load measures the allow path)."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    frame = request_frame(fx)
    request = external_auth_pb2.CheckRequest.FromString(frame[5:])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5)
    if response.status.code != 0:
        raise RuntimeError(f"the bench request is not allowed: {response}")


def run_case(case: str, fx: Fixture, args: argparse.Namespace) -> dict[str, object]:
    frame_file = fx.workdir / "request.bin"
    frame_file.write_bytes(request_frame(fx))
    floor_port, ext_port, admin_port = free_port(), free_port(), free_port()
    floor = subprocess.Popen(server_command([PY, str(ROOT / "bench" / "floor_server.py"), str(floor_port)]))
    ext = subprocess.Popen(
        server_command([PY, "-m", "extsvc", "serve", "--config", str(write_config(fx, case)),
                        "--grpc-address", f"127.0.0.1:{ext_port}",
                        "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "WARNING"]),
        cwd=fx.workdir,
    )
    try:
        wait_port(floor_port)
        wait_ready(admin_port)
        check_allowed(ext_port, fx)
        warm = max(args.requests // 10, 500)
        for port, pid in ((floor_port, floor.pid), (ext_port, ext.pid)):
            h2load(port, CHECK_PATH, frame_file, pid, warm, args.clients, args.streams)
        floor_samples, ext_samples = [], []
        for _ in range(args.rounds):
            floor_samples.append(h2load(floor_port, CHECK_PATH, frame_file, floor.pid, args.requests,
                                        args.clients, args.streams))
            ext_samples.append(h2load(ext_port, CHECK_PATH, frame_file, ext.pid, args.requests,
                                      args.clients, args.streams))
    finally:
        for proc in (floor, ext):
            proc.terminate()
            proc.wait(timeout=15)
    ratios = [e.rps / f.rps for e, f in zip(ext_samples, floor_samples, strict=True)]
    return {
        "case": case,
        "floor": median_sample(floor_samples),
        "extsvc": median_sample(ext_samples),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def print_table(results: list[dict[str, object]]) -> None:
    print("| case | server | req/s | p50 ms | p99 ms | CPU µs/RPC | failed | ratio vs floor |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        for name in ("floor", "extsvc"):
            s: Sample = result[name]  # type: ignore[assignment]
            ratio = f"**{result['ratio']:.2f}**" if name == "extsvc" else ""
            print(f"| {result['case']} | {name} | {s.rps:,.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} "
                  f"| {s.cpu_us:.0f} | {s.failed} | {ratio} |")
        ratios = ", ".join(f"{r:.2f}" for r in result["ratios"])  # type: ignore[attr-defined]
        print(f"|  | rounds |  |  |  |  |  | {ratios} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per client")
    parser.add_argument("--envoy", action="store_true", help="also run the Envoy + wrk case")
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per round (--envoy)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (--envoy)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    add_pin_argument(parser)
    add_loop_arguments(parser)
    args = parser.parse_args()
    ensure_tools("h2load", *(["wrk"] if args.envoy else []))
    pinning = apply_pinning(args.pin)
    loops = apply_loops(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="extsvc-bench-") as tmp:
        fx = make_fixture(Path(tmp))
        for case in args.case or list(CASES):
            print(f"running {case} ...", file=sys.stderr)
            results.append(run_case(case, fx, args))
        print(pinning)
        print(loops)
        print_table(results)
        if args.envoy:
            from envoy_bench import run_envoy_case

            envoy_result = run_envoy_case(fx, write_config(fx, "jwt-warm"), args)
            print()
            print("Envoy case: not pinned (wrk, Envoy and the server share every CPU)")
            print(envoy_result["table"])
            results.append({k: v for k, v in envoy_result.items() if k != "table"})
    if args.json:
        args.json.write_text(json.dumps(results, default=vars, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
