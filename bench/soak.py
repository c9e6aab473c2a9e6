"""Soak: mixed traffic against one ``extsvc serve`` for N minutes, with faults injected.

All three services are driven at once over gRPC on 127.0.0.1 -- ext_authz Checks (a jwt policy
with good, forged and missing tokens, and a header policy), rate-limit calls on a Redis store, and
ext_proc streams (headers and a JSON body through json-redact) -- while:

- redis-server is killed and restarted on the same port (``--redis-every``; down for 2 s),
- the JWKS endpoint flaps: answers 503, then drips its body 1 byte a second, then recovers
  (``--jwks-every``; the jwt policy refetches keys every few seconds),
- the policy file is rewritten (a good version, now and then a broken one: ``--reload-every``).

Reported: RPCs sent and failed (a gRPC error, or an answer that breaks a guarantee: a forged
token allowed, a redaction missing), answers per outcome, p50/p99 latency per service, the server's
RSS at start (after warm-up), end and peak. Exit code 1 if any RPC failed.

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --seconds 20 --redis-every 6 --jwks-every 7 --reload-every 4

Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extsvc.testing.extproc import body_message, headers_message
from extsvc.testing.harness import ExtsvcProcess, free_port

ISSUER = "https://idp.soak.test"
AUDIENCE = "soak"
SECRET_FIELD = "password"


# -- the identity provider: JWKS over HTTP, with a fault switch ------------------------------------


@dataclass
class Idp:
    key: rsa.RSAPrivateKey
    mode: str = "ok"  # ok | error | drip
    served: Counter[str] = field(default_factory=Counter)

    def jwks(self) -> bytes:
        numbers = self.key.public_key().public_numbers()

        def b64(value: int) -> str:
            raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        key = {"kty": "RSA", "kid": "soak", "use": "sig", "alg": "RS256",
               "n": b64(numbers.n), "e": b64(numbers.e)}
        return json.dumps({"keys": [key]}).encode()

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "soak-user", "iat": now,
                   "exp": now + 3600, **claims}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": "soak"})


def serve_idp(idp: Idp) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            mode = idp.mode
            idp.served[mode] += 1
            if mode == "error":
                self.send_response(503)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            body = idp.jwks()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                if mode == "drip":  # one byte a second, until the client gives up
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(1)
                else:
                    self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client hanging up on a dripping answer is the point

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


# -- redis-server that can be killed and brought back ----------------------------------------------


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                                  text=True, check=False)
            if done.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


# -- the config -----------------------------------------------------------------------------------


DOMAIN = """
domain: soak
descriptors:
  - key: client
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 1000000, algorithm: token_bucket}
"""


def config_text(jwks_url: str, redis_port: int, generation: int, broken: bool = False) -> str:
    text = f"""
version: 1
default_policy: members
policies:
  jwt:
    on_error: deny
    error_reply: {{status: 503}}
    steps:
      - plugin: jwt
        config:
          providers:
            - name: soak
              issuers: ["{ISSUER}"]
              audiences: ["{AUDIENCE}"]
              algorithms: [RS256]
              jwks_url: "{jwks_url}"
              jwks_ttl_s: 3
              jwks_min_refetch_interval_s: 1
              jwks_timeout_s: 2
          cache: {{enabled: false}}
  members:
    steps:
      - plugin: header-match
        config:
          match: {{headers: [{{name: x-member, present: true}}]}}
          on_match: allow
          on_no_match: deny
      - plugin: set-headers
        config: {{upstream: {{x-generation: "{generation}"}}}}
extproc:
  default_policy: redact
  policies:
    redact:
      processors:
        - plugin: json-redact
          config: {{request: [{SECRET_FIELD}]}}
ratelimit:
  config_dir: domains
  failure_mode: allow
  store: {{type: redis, url: "redis://127.0.0.1:{redis_port}/0"}}
"""
    if broken:  # a typo a hurried operator makes: must be rejected, the last good one serving
        text = text.replace("plugin: header-match", "plugin: header-mtach")
    return text


# -- traffic --------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failure_examples: list[str] = field(default_factory=list)

    began: float = field(default_factory=time.monotonic)

    def fail(self, service: str, why: str) -> None:
        self.failures[f"{service}: {why.splitlines()[0][:120]}"] += 1
        if len(self.failure_examples) < 10:
            at = time.monotonic() - self.began
            self.failure_examples.append(f"at {at:.1f} s: {service}: {why[:300]}")


def check_request(headers: dict[str, str], policy: str) -> Any:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "GET", "/soak", "soak.test"
    http.headers.update(headers)
    request.attributes.context_extensions["extsvc-policy"] = policy
    return request


async def authz_calls(channel: grpc.aio.Channel, idp: Idp, tally: Tally, stop: float) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    good = idp.token()
    forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 3600},
                        forged_key, algorithm="RS256", headers={"kid": "soak"})
    cases = [
        ("good-token", {"authorization": f"Bearer {good}"}, "jwt"),
        ("forged-token", {"authorization": f"Bearer {forged}"}, "jwt"),
        ("no-token", {}, "jwt"),
        ("member", {"x-member": "yes"}, "members"),
        ("stranger", {}, "members"),
    ]
    while time.monotonic() < stop:
        name, headers, policy = random.choice(cases)
        began = time.perf_counter()
        try:
            answer = await stub.Check(check_request(headers, policy), timeout=0.5)
        except grpc.aio.AioRpcError as exc:
            tally.fail("ext_authz", f"{exc.code().name} {exc.details()}")
            continue
        finally:
            tally.sent["ext_authz"] += 1
        tally.latency["ext_authz"].append(time.perf_counter() - began)
        allowed = answer.status.code == 0
        status = 200 if allowed else answer.denied_response.status.code
        tally.outcomes[f"ext_authz {name} -> {status}"] += 1
        if allowed and name in ("forged-token", "no-token", "stranger"):
            tally.fail("ext_authz", f"{name} was allowed")
        await asyncio.sleep(0.004)


async def ratelimit_calls(channel: grpc.aio.Channel, tally: Tally, stop: float) -> None:
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)
    while time.monotonic() < stop:
        key = random.choice(["client", "tenant"])
        request = rls_pb2.RateLimitRequest(domain="soak", hits_addend=1)
        request.descriptors.append(ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=f"v{random.randrange(50)}")]
        ))
        began = time.perf_counter()
        try:
            answer = await stub.ShouldRateLimit(request, timeout=0.5)
        except grpc.aio.AioRpcError as exc:
            tally.fail("ratelimit", f"{exc.code().name} {exc.details()}")
            continue
        finally:
            tally.sent["ratelimit"] += 1
        tally.latency["ratelimit"].append(time.perf_counter() - began)
        tally.outcomes[f"ratelimit {key} -> {rls_pb2.RateLimitResponse.Code.Name(answer.overall_code)}"] += 1
        await asyncio.sleep(0.004)


async def extproc_calls(channel: grpc.aio.Channel, tally: Tally, stop: float) -> None:
    stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)
    body = json.dumps({"user": "ann", SECRET_FIELD: "hunter2", "n": 1}).encode()
    while time.monotonic() < stop:
        messages = [
            headers_message({":method": "POST", ":path": "/soak", "content-type": "application/json"},
                            modes=("buffered", "none")),
            body_message(body),
        ]
        began = time.perf_counter()
        try:
            call = stub.Process(timeout=1.0)
            answers = []
            for message in messages:
                await call.write(message)
                answers.append(await call.read())
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:  # the server ends the stream
                pass
        except grpc.aio.AioRpcError as exc:
            tally.fail("ext_proc", f"{exc.code().name} {exc.details()}")
            continue
        finally:
            tally.sent["ext_proc"] += 1
        tally.latency["ext_proc"].append(time.perf_counter() - began)
        mutation = answers[-1].request_body.response.body_mutation
        if b"hunter2" in mutation.body or not mutation.body:
            tally.fail("ext_proc", "the body was not redacted")
        tally.outcomes["ext_proc redacted"] += 1
        await asyncio.sleep(0.004)


# -- faults ---------------------------------------------------------------------------------------


async def every(period: float, stop: float, action: Any) -> None:
    while True:
        await asyncio.sleep(period)
        if time.monotonic() >= stop:
            return
        await action()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="extsvc-soak-"))
    (workdir / "domains").mkdir()
    (workdir / "domains" / "soak.yaml").write_text(DOMAIN)
    idp = Idp(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    idp_server = serve_idp(idp)
    redis = Redis(workdir)
    redis.start()
    jwks_url = f"http://127.0.0.1:{idp_server.server_address[1]}/jwks"
    config = workdir / "extsvc.yaml"
    config.write_text(config_text(jwks_url, redis.port, 1))
    faults: Counter[str] = Counter()
    tally = Tally()
    rss: list[tuple[float, int]] = []
    server = ExtsvcProcess(config, args=["--reload-interval", "0.5"]).start()
    began = tally.began = time.monotonic()
    stop = began + args.seconds
    try:
        async def restart_redis() -> None:
            redis.kill()
            faults["redis restarts"] += 1
            await asyncio.sleep(2)
            await asyncio.to_thread(redis.start)

        async def flap_jwks() -> None:
            faults["jwks flaps"] += 1
            for mode in ("error", "drip"):
                idp.mode = mode
                await asyncio.sleep(min(5.0, args.jwks_every / 3))
            idp.mode = "ok"

        generation = 1

        async def reload() -> None:
            nonlocal generation
            generation += 1
            broken = generation % 4 == 0
            faults["reloads (broken)" if broken else "reloads"] += 1
            config.write_text(config_text(jwks_url, redis.port, generation, broken))

        async def sample_rss() -> None:
            rss.append((time.monotonic() - began, rss_kib(server.pid)))

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            tasks = [
                *(authz_calls(channel, idp, tally, stop) for _ in range(args.clients)),
                *(ratelimit_calls(channel, tally, stop) for _ in range(args.clients)),
                *(extproc_calls(channel, tally, stop) for _ in range(args.clients)),
                every(args.redis_every, stop, restart_redis),
                every(args.jwks_every, stop, flap_jwks),
                every(args.reload_every, stop, reload),
                every(max(1.0, min(10.0, args.seconds / 60)), stop, sample_rss),
            ]
            await asyncio.gather(*tasks)
        await sample_rss()
    finally:
        server.stop()
        if args.server_log:
            Path(args.server_log).write_text(server.log())
        redis.kill()
        idp_server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    report(args, tally, faults, rss, idp)
    return 1 if tally.failures else 0


def report(args: argparse.Namespace, tally: Tally, faults: Counter[str], rss: list[tuple[float, int]],
           idp: Idp) -> None:
    minutes = args.seconds / 60
    print(f"## Soak: {minutes:.1f} minutes, {args.clients} client(s) per service\n")
    print("| service | RPCs | failed | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for service in ("ext_authz", "ratelimit", "ext_proc"):
        samples = sorted(tally.latency[service]) or [0.0]
        failed = sum(n for k, n in tally.failures.items() if k.startswith(service))
        p50 = statistics.median(samples) * 1000
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000
        print(f"| {service} | {tally.sent[service]} | {failed} | {p50:.2f} | {p99:.2f} |")
    warm = [kib for t, kib in rss if t >= min(60.0, args.seconds / 4)] or [kib for _, kib in rss]
    if warm:
        print(f"\nRSS (MiB): start {warm[0] / 1024:.1f} (after warm-up), end {warm[-1] / 1024:.1f}, "
              f"peak {max(kib for _, kib in rss) / 1024:.1f}, drift {(warm[-1] - warm[0]) / 1024:+.1f}")
    print("\nFaults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print("JWKS answers: " + ", ".join(f"{k} {v}" for k, v in sorted(idp.served.items())))
    print("\nOutcomes:")
    for outcome, count in sorted(tally.outcomes.items()):
        print(f"  {outcome}: {count}")
    if tally.failures:
        print("\nFAILED:")
        for why, count in tally.failures.most_common():
            print(f"  {count} x {why}")
        print("First failures:")
        for example in tally.failure_examples:
            print(f"  {example}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default 5)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    parser.add_argument("--clients", type=int, default=4, help="concurrent callers per service")
    parser.add_argument("--redis-every", type=float, default=60.0, help="seconds between Redis restarts")
    parser.add_argument("--jwks-every", type=float, default=45.0, help="seconds between JWKS flaps")
    parser.add_argument("--reload-every", type=float, default=20.0, help="seconds between config rewrites")
    parser.add_argument("--server-log", help="write extsvc's log to this file at the end")
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (args.minutes or 5) * 60
    if shutil.which("redis-server") is None:
        print("soak needs redis-server (Debian: redis-server)", file=sys.stderr)
        return 2
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
