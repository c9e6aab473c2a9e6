"""Traffic insights' cost: decision log, live stream, tracing vs the same server with them off.

One ``extsvc serve`` process per configuration, all with the same policy file (a two-step ext_authz
policy -- a header-match that abstains, then allow -- and ratelimit_bench's rate-limit domain):

- ``baseline``: ``decision_log: off``, no tracing (the state before traffic insights);
- ``baseline-2``: a second, identical baseline process (A/A control: how far two equal servers
  differ in this run, i.e. the noise the other ratios should be read against);
- ``defaults``: the decision log at its default (every ext_authz answer recorded; stdout, capped
  at 200 lines/s, into a file);
- ``stream``: defaults plus one ``extsvc tail --follow --last 0 --json`` reader (output to
  /dev/null);
- ``tracing-100`` / ``tracing-1``: defaults plus OpenTelemetry tracing to an OTLP collector in
  this process, sample ratio 1.0 / 0.01 (the requests carry no traceparent: the ratio decides).

Each is driven by h2load with pre-encoded gRPC requests (authz_bench's CheckRequest, ratelimit_bench's
RateLimitRequest); every round runs every configuration once (the order rotated each round) so
that machine noise hits all. Printed per path: requests/s, p50/p99 latency, server CPU per RPC
(including the ``--settle`` seconds after each run, when deferred span exports and decision-log
writes finish) and the ratios to the baseline of throughput and of CPU per RPC (median of the
per-round ratios, and each round's), then as sanity checks: the spans the collector received,
the lines the decision log wrote and what the stream reader was sent.

    .venv/bin/python bench/insights_bench.py                       # every configuration, both paths
    .venv/bin/python bench/insights_bench.py --requests 20000 --rounds 5
    .venv/bin/python bench/insights_bench.py --case defaults --case tracing-100 --path authz

Needs h2load (Debian nghttp2-client; installed with apt-get if missing). When pinned, the servers
run on the servers' CPUs and the load generator, the ``extsvc tail`` reader and this process (the
OTLP collector) on the load generator's CPU: a reader and a collector are elsewhere in production.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz_bench import CHECK_PATH, Fixture, check_allowed
from authz_bench import request_frame as check_frame
from benchkit import (
    Sample,
    add_pin_argument,
    apply_pinning,
    cpu_seconds,
    ensure_tools,
    free_port,
    h2load,
    load_command,
    median_sample,
    server_command,
    wait_ready,
)
from ratelimit_bench import DOMAIN, RLS_PATH, check_answer
from ratelimit_bench import request_frame as rls_frame

from extsvc.testing.harness import http_get
from extsvc.testing.otlp import OtlpCollector

PY = sys.executable

#: configuration -> its settings (environment) beyond the shared ones; "tail": attach a reader
CONFIGS: dict[str, dict[str, str]] = {
    "baseline": {"EXTSVC_DECISION_LOG": "off"},
    "baseline-2": {"EXTSVC_DECISION_LOG": "off"},
    "defaults": {},
    "stream": {},
    "tracing-100": {"EXTSVC_TRACING_SAMPLE_RATIO": "1.0"},
    "tracing-1": {"EXTSVC_TRACING_SAMPLE_RATIO": "0.01"},
}
TAILED = {"stream"}
TRACED = {"tracing-100", "tracing-1"}
PATHS = {"authz": CHECK_PATH, "ratelimit": RLS_PATH}
#: spans one traced RPC makes: the SERVER span, plus one per policy step for Check
SPANS_PER_RPC = {"authz": 3, "ratelimit": 1}

POLICY = """\
version: 1
default_policy: bench
policies:
  bench:
    combine: first-decisive
    steps:
      - name: api-paths
        plugin: header-match
        config:
          match: {methods: [GET], path: {prefix: /api/}}
          on_match: abstain
          on_no_match: deny
      - name: allow
        plugin: allow
ratelimit:
  config_dir: domains
  store: {type: memory}
"""


class CountingCollector(OtlpCollector):
    """An OtlpCollector that only counts spans by (service.name, span name), keeping none: a
    whole run's spans would not fit its list, and counting costs this process less CPU."""

    def __init__(self) -> None:
        super().__init__(max_spans=1)
        self.counts: Counter[tuple[str, str]] = Counter()

    def _take(self, request: Any) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                counts.update((service, span.name) for span in scope_spans.spans)
        with self._lock:
            self.exports += 1
            self.counts.update(counts)

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self.counts)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def settle(self, quiet_s: float = 1.5, timeout_s: float = 15.0) -> Counter[tuple[str, str]]:
        """The counts once nothing new arrived for ``quiet_s`` (the exporters batch every 0.5 s)."""
        deadline = time.monotonic() + timeout_s
        last, since = self.snapshot(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.snapshot()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
        return last


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    stdout: Path | None
    tail: subprocess.Popen[bytes] | None = None
    samples: dict[str, list[Sample]] = field(default_factory=dict)


def write_config(workdir: Path) -> Path:
    (workdir / "domains").mkdir(exist_ok=True)
    (workdir / "domains" / "bench.yaml").write_text(DOMAIN)
    path = workdir / "insights.yaml"
    path.write_text(POLICY)
    return path


def server_env(name: str, collector: OtlpCollector, event_loop: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTSVC_")}
    env.update(EXTSVC_EVENT_LOOP=event_loop, EXTSVC_DRAIN_DELAY_S="0", EXTSVC_LOG_LEVEL="WARNING")
    env.update(CONFIGS[name])
    if name in TRACED:
        env.update(EXTSVC_TRACING_ENDPOINT=collector.endpoint, EXTSVC_TRACING_SERVICE_NAME=name)
    return env


def metric(admin_port: int, name: str, **labels: str) -> float:
    """The sum of one metric's samples with these labels on the server's /metrics (0: none)."""
    status, body = http_get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith((name + " ", name + "{")) and all(w in line for w in wanted))


def attach_tail(server: Server) -> None:
    """Start ``extsvc tail --follow`` on ``server`` and wait until the server counts the reader."""
    server.tail = subprocess.Popen(
        load_command([PY, "-m", "extsvc", "tail", "--admin", f"127.0.0.1:{server.admin_port}",
                      "--follow", "--last", "0", "--json"]),
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while metric(server.admin_port, "extsvc_decision_stream_readers") < 1:
        if server.tail.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("extsvc tail did not attach")
        time.sleep(0.2)


def start_servers(names: list[str], config: Path, workdir: Path, collector: OtlpCollector,
                  args: argparse.Namespace) -> list[Server]:
    servers = []
    for name in names:
        port, admin_port = free_port(), free_port()
        stdout = None if CONFIGS[name].get("EXTSVC_DECISION_LOG") == "off" else workdir / f"{name}.out"
        with open(stdout or os.devnull, "wb") as out:
            proc = subprocess.Popen(
                server_command([PY, "-m", "extsvc", "serve", "--config", str(config),
                                "--grpc-address", f"127.0.0.1:{port}",
                                "--admin-address", f"127.0.0.1:{admin_port}"]),
                cwd=workdir, env=server_env(name, collector, args.event_loop), stdout=out,
            )
        servers.append(Server(name, proc, port, admin_port, stdout))
    return servers


def stop_servers(servers: list[Server]) -> None:
    procs = [p for s in servers for p in (s.tail, s.proc) if p is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def measure(server: Server, path: str, frame_file: Path, args: argparse.Namespace) -> Sample:
    """One h2load run, then ``--settle`` seconds for the work the server defers (span export every
    0.5 s, decision-log writes every 0.2 s): counted in this run's CPU per RPC, and not left to
    steal the CPU of the next configuration's run (all servers share the servers' CPUs)."""
    sample = h2load(server.port, PATHS[path], frame_file, server.proc.pid, args.requests,
                    args.clients, args.streams)
    if args.settle > 0:
        before = cpu_seconds(server.proc.pid)
        time.sleep(args.settle)
        answered = max(sample.requests - sample.failed, 1)
        sample.cpu_us += (cpu_seconds(server.proc.pid) - before) / answered * 1e6
    return sample


def ratios(samples: list[Sample], base: list[Sample]) -> tuple[list[float], list[float]]:
    """Per round: throughput ratio and CPU-per-RPC ratio to the baseline."""
    return ([s.rps / b.rps for s, b in zip(samples, base, strict=True)],
            [s.cpu_us / b.cpu_us for s, b in zip(samples, base, strict=True)])


def print_table(path: str, servers: list[Server]) -> None:
    base = next(s for s in servers if s.name == "baseline").samples[path]
    print(f"\n{path} ({PATHS[path]})\n")
    print("| configuration | req/s | p50 ms | p99 ms | CPU µs/RPC | failed | req/s ratio vs baseline "
          "| rounds | CPU/RPC ratio vs baseline | rounds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for server in servers:
        samples = server.samples[path]
        m = median_sample(samples)
        rps_r, cpu_r = ratios(samples, base)
        rounds = ", ".join(f"{r:.3f}" for r in rps_r)
        cpu_rounds = ", ".join(f"{r:.3f}" for r in cpu_r)
        print(f"| {server.name} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.cpu_us:.0f} "
              f"| {m.failed} | **{statistics.median(rps_r):.3f}** | {rounds} "
              f"| **{statistics.median(cpu_r):.3f}** | {cpu_rounds} |")
    defaults = next((s for s in servers if s.name == "defaults"), None)
    over = [s for s in servers if s.name in TAILED | TRACED]
    if defaults is not None and over:  # those are defaults + one feature: that feature alone
        parts = []
        for server in over:
            rps_r, cpu_r = ratios(server.samples[path], defaults.samples[path])
            parts.append(f"{server.name} {statistics.median(rps_r):.3f} / "
                         f"{statistics.median(cpu_r):.3f}")
        print(f"\nvs defaults instead (the feature alone; req/s / CPU per RPC, medians of rounds): "
              f"{'; '.join(parts)}")


def print_sanity(servers: list[Server], spans: Counter[tuple[str, str]], run_s: float) -> None:
    print()
    for server in servers:
        if server.name in TRACED:
            for path, samples in server.samples.items():
                requests = sum(s.requests for s in samples)
                rpc = {"authz": "envoy.service.auth.v3.Authorization/Check",
                       "ratelimit": "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"}[path]
                roots = spans[(server.name, rpc)]
                steps = sum(n for (svc, name), n in spans.items()
                            if svc == server.name and name.startswith("step ")) if path == "authz" else 0
                expected = requests * SPANS_PER_RPC[path]
                print(f"- {server.name} {path}: {requests:,} measured RPCs; collector received "
                      f"{roots:,} {rpc.rsplit('.', 1)[1]} spans"
                      + (f" + {steps:,} step spans" if path == "authz" else "")
                      + f" = {roots + steps:,}, expected ~{expected:,} at ratio 1 "
                      f"(received/expected {(roots + steps) / expected:.4f})")
        if server.stdout is not None:
            lines = server.stdout.read_bytes().count(b"\n")
            print(f"- {server.name}: decision log wrote {lines:,} lines to stdout "
                  f"(cap 200/s over a {run_s:.0f} s run)")
        if server.tail is not None:
            sent = metric(server.admin_port, "extsvc_decision_log_records_total", sink="stream")
            dropped = metric(server.admin_port, "extsvc_decision_log_dropped_total",
                             sink="stream", reason="slow-reader")
            readers = metric(server.admin_port, "extsvc_decision_stream_readers")
            print(f"- {server.name}: {readers:.0f} stream reader attached; records sent to it "
                  f"{sent:,.0f}, dropped (slow reader) {dropped:,.0f}"
                  + ("" if server.tail.poll() is None else "; the tail process had EXITED"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CONFIGS),
                        help="configurations to run (repeatable; baseline is always run)")
    parser.add_argument("--path", action="append", choices=list(PATHS),
                        help="ext_authz Check and/or rate-limit ShouldRateLimit (default: both)")
    parser.add_argument("--requests", type=int, default=4_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per client")
    parser.add_argument("--settle", type=float, default=0.6,
                        help="seconds after each run whose server CPU still counts for it (the "
                             "deferred span export and decision-log writes; default 0.6)")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="extsvc's event loop (default auto = uvloop)")
    add_pin_argument(parser)
    args = parser.parse_args()
    ensure_tools("h2load")
    pinning = apply_pinning(args.pin)
    if pinning.startswith("pinned"):  # the collector (this process's threads) with the load
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    names = [n for n in CONFIGS if n == "baseline" or n in (args.case or CONFIGS)]
    paths = args.path or list(PATHS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="extsvc-insights-") as tmp, CountingCollector() as collector:
        workdir = Path(tmp)
        config = write_config(workdir)
        fx = Fixture(workdir, token="not-checked", api_key="not-checked")
        frames = {"authz": workdir / "check.bin", "ratelimit": workdir / "rls.bin"}
        frames["authz"].write_bytes(check_frame(fx))
        frames["ratelimit"].write_bytes(rls_frame())
        servers = start_servers(names, config, workdir, collector, args)
        try:
            for server in servers:
                wait_ready(server.admin_port)
                check_allowed(server.port, fx)
                check_answer(server.port)
                if server.name in TAILED:
                    attach_tail(server)
            print(f"warming up {', '.join(names)} ...", file=sys.stderr)
            warm = max(args.requests // 10, 500)
            for server in servers:
                for path in paths:
                    h2load(server.port, PATHS[path], frames[path], server.proc.pid, warm,
                           args.clients, args.streams)
                    server.samples[path] = []
            collector.settle(quiet_s=1.0)
            collector.reset()
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}/{args.rounds} ...", file=sys.stderr)
                order = servers[round_ % len(servers):] + servers[: round_ % len(servers)]
                for path in paths:
                    for server in order:
                        server.samples[path].append(measure(server, path, frames[path], args))
            spans = collector.settle()
            run_s = time.monotonic() - started
            print(pinning)
            print(f"event loop: {args.event_loop}; {args.rounds} rounds x {args.requests:,} requests "
                  f"per configuration and path; {args.clients} clients x {args.streams} streams; "
                  f"whole run {run_s:.0f} s")
            for path in paths:
                print_table(path, servers)
            print_sanity(servers, spans, run_s)
        finally:
            stop_servers(servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
