"""Rate-limit throughput: extsvc (memory and Redis stores) vs a bare RLS servicer (the floor).

Every server is driven by h2load with the same pre-encoded gRPC RateLimitRequest of 3 descriptors
(the shape Envoy sends for c-ratelimit.yaml's route: generic_key + api_key, remote_address,
generic_key + destination_cluster); rounds alternate between the floor and the case so that machine
noise hits both. Printed per case: requests/s, p50/p99 latency, server CPU per RPC, the ratio to the
floor's throughput (median of the rounds) and, for Redis, the Redis round trips per RPC counted
from ``INFO commandstats`` (EVALSHA + EVAL + pipelines' commands) over the measured rounds.

    .venv/bin/python bench/ratelimit_bench.py
    .venv/bin/python bench/ratelimit_bench.py --requests 20000 --rounds 5 --case redis

Needs h2load (Debian nghttp2-client) and redis-server. Everything runs on 127.0.0.1 (its own
redis-server on a free port) and stops by itself.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchkit import (
    Sample,
    add_loop_arguments,
    add_pin_argument,
    apply_loops,
    apply_pinning,
    cpu_seconds,
    free_port,
    h2load,
    load_command,
    median_sample,
    server_command,
    wait_port,
    wait_ready,
)
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from floorkit import serve_floor

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RLS_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
CASES = ("memory", "redis")

DOMAIN = """
domain: bench
descriptors:
  - key: generic_key
    value: api
    descriptors:
      - key: api_key
        rate_limit: {unit: hour, requests_per_unit: 4000000000, name: api}
  - key: remote_address
    rate_limit: {unit: hour, requests_per_unit: 4000000000, name: per-ip}
  - key: generic_key
    value: per_route
    descriptors:
      - key: destination_cluster
        rate_limit: {unit: hour, requests_per_unit: 4000000000, name: per-route}
"""


def rls_request() -> rls_pb2.RateLimitRequest:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    descriptor = ratelimit_pb2.RateLimitDescriptor
    return rls_pb2.RateLimitRequest(domain="bench", descriptors=[
        descriptor(entries=[entry(key="generic_key", value="api"), entry(key="api_key", value="k1")]),
        descriptor(entries=[entry(key="remote_address", value="127.0.0.1")]),
        descriptor(entries=[entry(key="generic_key", value="per_route"),
                            entry(key="destination_cluster", value="backend")]),
    ])


def request_frame() -> bytes:
    payload = rls_request().SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# --- the floor: a bare servicer answering a constant OK with 3 statuses ---------------------


def run_floor(port: int) -> None:
    from envoy.service.ratelimit.v3 import rls_pb2_grpc

    ok = rls_pb2.RateLimitResponse.OK
    answer = rls_pb2.RateLimitResponse(
        overall_code=ok, statuses=[rls_pb2.RateLimitResponse.DescriptorStatus(code=ok)] * 3
    )

    class Floor(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
        async def ShouldRateLimit(self, request: object, context: object) -> object:
            return answer

    serve_floor(
        lambda server: rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Floor(), server), port
    )


# --- plumbing --------------------------------------------------------------------------------


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout


def redis_calls(port: int) -> int:
    """Commands clients sent (script-internal commands excluded)."""
    calls = 0
    for line in redis_cli(port, "info", "commandstats").splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_multi:")):
            calls += int(dict(p.split("=", 1) for p in line.split(":", 1)[1].split(","))["calls"])
    return calls


def check_answer(port: int) -> None:
    """The bench request really is limited (3 statuses with current_limit) and allowed."""
    import grpc
    from envoy.service.ratelimit.v3 import rls_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(rls_request(), timeout=5)
    if answer.overall_code != rls_pb2.RateLimitResponse.OK or len(answer.statuses) != 3 or not all(
        s.HasField("current_limit") for s in answer.statuses
    ):
        raise RuntimeError(f"unexpected answer to the bench request: {answer}")


def write_config(workdir: Path, case: str, redis_port: int | None, window_us: int = 500) -> Path:
    (workdir / "domains").mkdir(exist_ok=True)
    (workdir / "domains" / "bench.yaml").write_text(DOMAIN)
    store = "{type: memory}" if case == "memory" else \
        f"{{type: redis, url: 'redis://127.0.0.1:{redis_port}/0', pool: 64, " \
        f"pipeline_window_us: {window_us}}}"
    path = workdir / f"{case}.yaml"
    path.write_text(f"version: 1\nratelimit:\n  config_dir: domains\n  store: {store}\n")
    return path


def run_case(case: str, workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    frame_file = workdir / "request.bin"
    frame_file.write_bytes(request_frame())
    redis: subprocess.Popen[bytes] | None = None
    redis_port = None
    if case == "redis":
        redis_port = free_port()
        # Where redis-server runs when pinned: with the load generator (default: Redis is another
        # host in production, so its CPU is not the server's), or with the servers.
        place = server_command if args.redis_cpu == "server" else load_command
        redis = subprocess.Popen(
            place(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no"]), stdout=subprocess.DEVNULL,
        )
        wait_port(redis_port)
    floor_port, ext_port, admin_port = free_port(), free_port(), free_port()
    floor = subprocess.Popen(server_command([PY, __file__, "--serve-floor", str(floor_port)]))
    ext = subprocess.Popen(
        server_command([PY, "-m", "extsvc", "serve", "--config",
                        str(write_config(workdir, case, redis_port, args.pipeline_window_us)),
                        "--grpc-address", f"127.0.0.1:{ext_port}",
                        "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "WARNING"]),
        cwd=workdir,
    )
    try:
        wait_port(floor_port)
        wait_ready(admin_port)
        check_answer(ext_port)
        warm = max(args.requests // 10, 500)
        for port, pid in ((floor_port, floor.pid), (ext_port, ext.pid)):
            h2load(port, RLS_PATH, frame_file, pid, warm, args.clients, args.streams)
        floor_samples, ext_samples = [], []
        calls_before = redis_calls(redis_port) if redis_port else 0
        redis_cpu = 0.0
        for _ in range(args.rounds):
            floor_samples.append(h2load(floor_port, RLS_PATH, frame_file, floor.pid, args.requests,
                                        args.clients, args.streams))
            before = cpu_seconds(redis.pid) if redis is not None else 0.0
            ext_samples.append(h2load(ext_port, RLS_PATH, frame_file, ext.pid, args.requests,
                                      args.clients, args.streams))
            if redis is not None:
                redis_cpu += cpu_seconds(redis.pid) - before
        round_trips = redis_us = None
        if redis_port:
            answered = sum(s.requests for s in ext_samples)
            round_trips = (redis_calls(redis_port) - calls_before) / answered
            redis_us = redis_cpu / answered * 1e6
    finally:
        for proc in (floor, ext, redis):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=15)
    ratios = [e.rps / f.rps for e, f in zip(ext_samples, floor_samples, strict=True)]
    return {
        "case": case,
        "floor": median_sample(floor_samples),
        "extsvc": median_sample(ext_samples),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "round_trips": round_trips,
        "redis_cpu_us": redis_us,
    }


def print_table(results: list[dict[str, object]]) -> None:
    print("| case | server | req/s | p50 ms | p99 ms | CPU µs/RPC | failed | ratio vs floor "
          "| Redis round trips/RPC | redis-server CPU µs/RPC |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        for name in ("floor", "extsvc"):
            s: Sample = result[name]  # type: ignore[assignment]
            ratio = f"**{result['ratio']:.2f}**" if name == "extsvc" else ""
            trips, redis_us = result["round_trips"], result["redis_cpu_us"]
            rt = f"{trips:.3f}" if name == "extsvc" and isinstance(trips, float) else ""
            ru = f"{redis_us:.0f}" if name == "extsvc" and isinstance(redis_us, float) else ""
            print(f"| {result['case']} | {name} | {s.rps:,.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} "
                  f"| {s.cpu_us:.0f} | {s.failed} | {ratio} | {rt} | {ru} |")
        ratios = ", ".join(f"{r:.2f}" for r in result["ratios"])  # type: ignore[attr-defined]
        print(f"|  | rounds |  |  |  |  |  | {ratios} |  |  |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--case", action="append", choices=CASES)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per client")
    add_pin_argument(parser)
    add_loop_arguments(parser)
    parser.add_argument(
        "--pipeline-window-us", type=int, default=500,
        help="the Redis store's pipeline_window_us (default 500, the store's default; 0: off)",
    )
    parser.add_argument(
        "--redis-cpu", choices=("load", "server"), default="load",
        help="with --pin: run redis-server on the load generator's CPU (as if on another host, "
             "the default) or on the servers' CPU (its work then counts against extsvc)",
    )
    args = parser.parse_args()
    if args.serve_floor:
        run_floor(args.serve_floor)
        return 0
    missing = [t for t in ("h2load", "redis-server") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install nghttp2-client redis-server)",
              file=sys.stderr)
        return 2
    pinning = apply_pinning(args.pin)
    loops = apply_loops(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="extsvc-rl-bench-") as tmp:
        for case in args.case or CASES:
            print(f"running {case} ...", file=sys.stderr)
            results.append(run_case(case, Path(tmp), args))
    print(pinning + (f"; redis-server on the {args.redis_cpu} CPU" if "pinned:" in pinning else "")
          + f"; Redis store pipeline_window_us: {args.pipeline_window_us}")
    print(loops)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
