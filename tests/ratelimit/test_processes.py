"""``extsvc serve`` processes against a real Redis: accuracy across processes, Redis failures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extsvc.testing.harness import ExtsvcProcess, wait_for_window_room

from .servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
LIMIT = 150

DOMAIN = f"""
domain: acc
descriptors:
  - key: fixed
    rate_limit: {{unit: hour, requests_per_unit: {LIMIT}}}
  - key: sliding
    rate_limit: {{unit: hour, requests_per_unit: {LIMIT}, algorithm: sliding_window}}
  - key: bucket
    rate_limit: {{unit: hour, requests_per_unit: {LIMIT}, algorithm: token_bucket}}
"""


@pytest.fixture(autouse=True)
def _room_in_the_hour() -> None:
    """These tests count hour windows on the real clock: never across an hour's end."""
    wait_for_window_room(3600)


def write_config(tmp: Path, url: str, failure_mode: str = "allow", timeout_ms: int = 100) -> Path:
    (tmp / "domains").mkdir(exist_ok=True)
    (tmp / "domains" / "acc.yaml").write_text(DOMAIN)
    config = tmp / "extsvc.yaml"
    config.write_text(
        "version: 1\nratelimit:\n  config_dir: domains\n"
        f"  store: {{type: redis, url: '{url}', timeout_ms: {timeout_ms}}}\n"
        f"  failure_mode: {failure_mode}\n"
    )
    return config


def rl_request(tag: str) -> Any:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    return rls_pb2.RateLimitRequest(domain="acc", descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[entry(key=key, value=tag)])
        for key in ("fixed", "sliding", "bucket")
    ])


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


async def test_two_processes_64_clients_each_admit_exactly_the_limit(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    config = write_config(tmp_path, own_redis.url, timeout_ms=2000)
    with ExtsvcProcess(config) as one, ExtsvcProcess(config) as two:
        per_server = 64
        total = 3 * LIMIT  # three times what may pass
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        admitted = {"fixed": 0, "sliding": 0, "bucket": 0}
        answered = 0

        async def client(stub: Any) -> None:
            nonlocal answered
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                answer = await stub.ShouldRateLimit(rl_request("t1"), timeout=5)
                answered += 1
                for name, status in zip(admitted, answer.statuses, strict=True):
                    admitted[name] += status.code == OK

        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") for p in (one, two)]
        try:
            stubs = [rls_pb2_grpc.RateLimitServiceStub(c) for c in channels]
            await asyncio.gather(*(client(stub) for stub in stubs for _ in range(per_server)))
        finally:
            for channel in channels:
                await channel.close()
        assert answered == total
        assert admitted == {"fixed": LIMIT, "sliding": LIMIT, "bucket": LIMIT}
        stats = own_redis.commandstats()
        # One round trip per RPC; a process's first EVALSHA on a fresh Redis gets NOSCRIPT and is
        # repeated after SCRIPT LOAD (once per process at most).
        assert stats.get("evalsha", 0) - stats.get("script|load", 0) == total


async def test_redis_killed_under_load_then_back(tmp_path: Path, own_redis: RedisServer) -> None:
    config = write_config(tmp_path, own_redis.url, failure_mode="deny", timeout_ms=200)
    with ExtsvcProcess(config) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            log: list[tuple[float, str]] = []  # (time, "ok" | "denied" | "error")
            stop = asyncio.Event()

            async def load(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        answer = await stub.ShouldRateLimit(rl_request(f"w{worker}-{n}"), timeout=0.5)
                        ok = answer.overall_code == OK and answer.statuses[0].HasField("current_limit")
                        log.append((time.monotonic(), "ok" if ok else "denied"))
                    except grpc.aio.AioRpcError:
                        log.append((time.monotonic(), "error"))
                    await asyncio.sleep(0.005)

            workers = [asyncio.create_task(load(i)) for i in range(8)]
            try:
                await asyncio.sleep(0.3)
                assert log and all(kind == "ok" for _, kind in log)

                # A hung Redis: answers keep coming, per failure_mode, within the deadline.
                assert own_redis.proc is not None
                os.kill(own_redis.proc.pid, signal.SIGSTOP)
                hung_at = time.monotonic()
                started = time.monotonic()
                answer = await stub.ShouldRateLimit(rl_request("probe"), timeout=0.5)
                assert answer.overall_code == OVER and time.monotonic() - started < 0.5
                await asyncio.sleep(0.3)
                os.kill(own_redis.proc.pid, signal.SIGKILL)  # then dead
                own_redis.proc.wait()
                own_redis.proc = None
                await asyncio.sleep(0.5)
                down = [kind for t, kind in log if t > hung_at + 0.05]
                assert down and set(down) == {"denied"}  # failure_mode: deny, never an RPC error
                assert server.running() and server.admin("/healthz")[0] == 200

                own_redis.start()
                back_at = time.monotonic()
                deadline = back_at + 2.0
                while time.monotonic() < deadline and not any(t > back_at and k == "ok" for t, k in log):
                    await asyncio.sleep(0.02)
                recovered = [t for t, k in log if t > back_at and k == "ok"]
                assert recovered, "no good answer within 2 s of Redis returning"
                assert recovered[0] - back_at < 2.0
            finally:
                stop.set()
                await asyncio.gather(*workers)
        assert server.metric("extsvc_ratelimit_store_errors_total", store="redis", answer="deny") > 0
