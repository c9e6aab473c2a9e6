"""ext_proc throughput: extsvc with the `headers` processor vs a bare grpc.aio processor, same run.

A grpc.aio load client (a separate process, ``--concurrency`` streams in flight) plays Envoy:
per HTTP request it opens one ``Process`` stream and sends the phases one at a time, waiting for
each answer (Envoy's turn-taking), then half-closes. Like Envoy it obeys ``mode_override``: the
phases an answer switches off are not sent. Rounds alternate between the two servers so that
machine noise hits both. Printed per case: streams/s, p50/p99 stream latency, gRPC messages per
stream (client -> server), server CPU per stream, and the extsvc/floor ratios (median of rounds).

Cases:
  headers    request + response headers (Envoy: bodies NONE), `headers` sets one header each way
             (fixed changes: extsvc sends a prebuilt answer, Processor.fixed_headers)
  hooks      the same answers, but the processor's hooks run for every message (a rename)
  buffered   + BUFFERED request and response bodies (1 KiB JSON), same processor
  override   Envoy configured for headers + BUFFERED bodies, but the policy only needs the request
             headers: extsvc's mode_override leaves 1 message per stream; the floor gets all 4

    .venv/bin/python bench/extproc_bench.py
    .venv/bin/python bench/extproc_bench.py --requests 20000 --rounds 5 --case override
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from benchkit import (
    add_loop_arguments,
    add_pin_argument,
    apply_loops,
    apply_pinning,
    cpu_seconds,
    free_port,
    load_command,
    server_command,
    wait_port,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

CASES: dict[str, dict[str, object]] = {
    "headers": {
        "override": False,
        "modes": ("none", "none"),
        "processors": [{"plugin": "headers", "config": {
            "request": {"set": {"x-extproc": "on"}}, "response": {"set": {"x-frame-options": "DENY"}}}}],
    },
    "buffered": {
        "override": False,  # the same 4 messages as the floor: this case measures body handling
        "modes": ("buffered", "buffered"),
        "processors": [{"plugin": "headers", "config": {
            "request": {"set": {"x-extproc": "on"}}, "response": {"set": {"x-frame-options": "DENY"}}}}],
    },
    "hooks": {
        "override": False,
        "modes": ("none", "none"),
        # the same answers as `headers`, but a rename (of a header the requests do not carry)
        # makes the changes depend on the message: the processor's hooks run for every message
        "processors": [{"plugin": "headers", "config": {
            "request": {"set": {"x-extproc": "on"}, "rename": {"x-absent": "x-renamed"}},
            "response": {"set": {"x-frame-options": "DENY"}, "rename": {"x-absent": "x-renamed"}}}}],
    },
    "override": {
        "modes": ("buffered", "buffered"),
        "processors": [{"plugin": "headers", "config": {"request": {"set": {"x-extproc": "on"}}}}],
    },
}


# -- the load client (runs in its own process: `extproc_bench.py --client ...`) --------------------


def build_messages(modes: tuple[str, str]) -> list[tuple[str, object]]:
    from extsvc.testing.extproc import body_message, headers_message

    request_headers = {
        ":authority": "bench", ":path": "/api/orders?id=7", ":method": "POST", ":scheme": "http",
        "content-type": "application/json", "content-length": "1024", "user-agent": "bench",
        "accept": "*/*", "x-forwarded-proto": "http", "x-request-id": "bench-request-id",
    }
    response_headers = {":status": "200", "content-type": "application/json",
                        "content-length": "1024", "server": "envoy", "x-backend": "echo"}
    body = json.dumps({"data": "x" * 1000}).encode()[:1024]
    messages: list[tuple[str, object]] = [
        ("request_headers", headers_message(request_headers, modes=modes))]
    if modes[0] != "none":
        messages.append(("request_body", body_message(body)))
    messages.append(("response_headers", headers_message(response_headers, response=True)))
    if modes[1] != "none":
        messages.append(("response_body", body_message(body, response=True)))
    return messages


async def client(port: int, modes: tuple[str, str], requests: int, concurrency: int) -> dict[str, object]:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

    messages = build_messages(modes)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)
    latencies: list[float] = []
    sent_total = 0
    failed = 0
    remaining = [requests]

    async def one() -> None:
        nonlocal sent_total, failed
        call = stub.Process()
        skip: set[str] = set()
        started = time.perf_counter()
        try:
            for phase, message in messages:
                if phase in skip:
                    continue
                await call.write(message)
                sent_total += 1
                answer = await call.read()
                which = answer.WhichOneof("response")
                if which != phase:
                    raise RuntimeError(f"{phase} answered with {which}")
                if answer.HasField("mode_override"):  # obey it like Envoy does
                    mode = answer.mode_override
                    if mode.request_body_mode == 0:
                        skip.add("request_body")
                    if mode.response_body_mode == 0:
                        skip.add("response_body")
                    if mode.response_header_mode == 2:
                        skip.add("response_headers")
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF or await call.code() != grpc.StatusCode.OK:
                raise RuntimeError("the stream did not end cleanly")
        except Exception as exc:
            failed += 1
            if failed == 1:
                print(f"first failure: {exc!r}", file=sys.stderr)
            return
        latencies.append(time.perf_counter() - started)

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await channel.close()
    latencies.sort()
    done = len(latencies)
    return {
        "rps": done / elapsed,
        "p50_ms": latencies[done // 2] * 1000 if done else 0.0,
        "p99_ms": latencies[min(done - 1, int(done * 0.99))] * 1000 if done else 0.0,
        "messages": sent_total / max(done + failed, 1),
        "done": done,
        "failed": failed,
    }


# -- the driver -------------------------------------------------------------------------------------


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    messages: float
    cpu_us: float
    failed: int


def run_load(port: int, pid: int, modes: tuple[str, str], requests: int, concurrency: int) -> Sample:
    before = cpu_seconds(pid)
    out = subprocess.run(
        load_command([PY, __file__, "--client", str(port), ",".join(modes), str(requests),
                      str(concurrency)]),
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    cpu = cpu_seconds(pid) - before
    result = json.loads(out.strip().splitlines()[-1])
    done = max(int(result["done"]), 1)
    if result["done"] == 0:
        raise RuntimeError(f"no stream succeeded: {result}")
    return Sample(result["rps"], result["p50_ms"], result["p99_ms"], result["messages"],
                  cpu / done * 1e6, int(result["failed"]))


def write_config(workdir: Path, case: str) -> Path:
    policy = {"processors": CASES[case]["processors"],
              "mode_override": CASES[case].get("override", True)}
    config = {"extproc": {"default_policy": "bench", "policies": {"bench": policy}}}
    path = workdir / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(*(statistics.median(getattr(s, f) for s in samples)
                    for f in ("rps", "p50_ms", "p99_ms", "messages", "cpu_us")),
                  failed=sum(s.failed for s in samples))  # type: ignore[call-arg]


def run_case(case: str, workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    modes: tuple[str, str] = CASES[case]["modes"]  # type: ignore[assignment]
    floor_port, ext_port, admin_port = free_port(), free_port(), free_port()
    floor = subprocess.Popen(
        server_command([PY, str(ROOT / "bench" / "extproc_floor.py"), str(floor_port)])
    )
    ext = subprocess.Popen(
        server_command([PY, "-m", "extsvc", "serve", "--config", str(write_config(workdir, case)),
                        "--grpc-address", f"127.0.0.1:{ext_port}",
                        "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "WARNING"]),
        cwd=workdir,
    )
    try:
        wait_port(floor_port)
        wait_ready(admin_port)
        warm = max(args.requests // 10, 300)
        for port, pid in ((floor_port, floor.pid), (ext_port, ext.pid)):
            run_load(port, pid, modes, warm, args.concurrency)
        floor_samples, ext_samples = [], []
        for _ in range(args.rounds):
            floor_samples.append(run_load(floor_port, floor.pid, modes, args.requests, args.concurrency))
            ext_samples.append(run_load(ext_port, ext.pid, modes, args.requests, args.concurrency))
    finally:
        for proc in (floor, ext):
            proc.terminate()
            proc.wait(timeout=15)
    return {
        "case": case,
        "floor": median_sample(floor_samples),
        "extsvc": median_sample(ext_samples),
        "ratio": statistics.median(e.rps / f.rps for e, f in zip(ext_samples, floor_samples, strict=True)),
        "ratios": [e.rps / f.rps for e, f in zip(ext_samples, floor_samples, strict=True)],
        "cpu_ratio": statistics.median(
            e.cpu_us / f.cpu_us for e, f in zip(ext_samples, floor_samples, strict=True)),
    }


def print_table(results: list[dict[str, object]]) -> None:
    print("| case | server | streams/s | p50 ms | p99 ms | msgs/stream | server CPU µs/stream "
          "| failed | throughput vs floor | CPU vs floor |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        for name in ("floor", "extsvc"):
            s: Sample = result[name]  # type: ignore[assignment]
            ratio = f"**{result['ratio']:.2f}**" if name == "extsvc" else ""
            cpu = f"{result['cpu_ratio']:.2f}" if name == "extsvc" else ""
            print(f"| {result['case']} | {name} | {s.rps:,.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} "
                  f"| {s.messages:.1f} | {s.cpu_us:.0f} | {s.failed} | {ratio} | {cpu} |")
        ratios = ", ".join(f"{r:.2f}" for r in result["ratios"])  # type: ignore[attr-defined]
        print(f"|  | rounds |  |  |  |  |  |  | {ratios} |  |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, modes, requests, concurrency = sys.argv[2:6]
        result = asyncio.run(client(int(port), tuple(modes.split(",")),  # type: ignore[arg-type]
                                    int(requests), int(concurrency)))
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--requests", type=int, default=5000, help="streams per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    add_pin_argument(parser)
    add_loop_arguments(parser)
    args = parser.parse_args()
    pinning = apply_pinning(args.pin)
    loops = apply_loops(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="extsvc-extproc-bench-") as tmp:
        for case in args.case or list(CASES):
            print(f"running {case} ...", file=sys.stderr)
            results.append(run_case(case, Path(tmp), args))
    print(pinning)
    print(loops)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, default=vars, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
