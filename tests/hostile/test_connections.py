"""gRPC connections that hold a file descriptor and do nothing are closed (docs/hardening.md).

A connection that never finishes its HTTP/2 handshake, or stops making calls, is closed after
``grpc_handshake_timeout_s`` / ``grpc_max_connection_idle_s``, so idle connections cannot use up
the process's descriptors (and with them /healthz and new connections from Envoy).
"""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from extsvc.testing import authz_stub, running_server

ALLOW = "default_policy: p\npolicies: {p: {steps: [{plugin: allow}]}}\n"


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (None if it stayed open for ``seconds``)."""
    began = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):  # the server's HTTP/2 preface may come first
            pass
    except TimeoutError:
        return None
    except OSError:
        pass  # reset: closed as well
    return time.monotonic() - began


async def test_a_connection_that_never_speaks_http2_is_closed() -> None:
    async with running_server(ALLOW, grpc_handshake_timeout_s=0.5) as server:
        silent = [socket.create_connection(("127.0.0.1", server.grpc_port)) for _ in range(20)]
        try:
            closed = await asyncio.gather(
                *(asyncio.to_thread(_closed_within, sock, 5.0) for sock in silent)
            )
        finally:
            for sock in silent:
                sock.close()
        assert all(seconds is not None and seconds < 3 for seconds in closed), closed


async def test_an_idle_connection_is_closed_and_the_next_call_reconnects() -> None:
    async with running_server(ALLOW, grpc_max_connection_idle_s=0.5) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = authz_stub(channel)
        answer = await stub.Check(external_auth_pb2.CheckRequest(), timeout=5)
        assert answer.status.code == 0
        deadline = time.monotonic() + 5
        while channel.get_state() is grpc.ChannelConnectivity.READY and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert channel.get_state() is not grpc.ChannelConnectivity.READY  # the server let it go
        answer = await stub.Check(external_auth_pb2.CheckRequest(), timeout=5)
        assert answer.status.code == 0


async def test_open_descriptors_are_on_metrics() -> None:
    import httpx

    async with running_server(ALLOW) as server, httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{server.admin_port}/metrics")).text
    samples = dict(
        line.split(" ", 1) for line in text.splitlines() if line.startswith("process_")
    )
    assert 0 < float(samples["process_open_fds"]) < float(samples["process_max_fds"])
