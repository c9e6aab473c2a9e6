"""The controller's admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP/1.1.

Small on purpose (what a kubelet probe and a Prometheus scrape need, nothing else): one request
per connection, the request line and headers bounded in bytes and time, any other path a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: bytes of request line + headers read before the request is refused
MAX_REQUEST_BYTES = 8192
#: seconds a client gets to send its request
REQUEST_TIMEOUT_S = 5.0


class AdminServer:
    """:param ready: whether the controller is ready (first full sync and first snapshot built).
    :param alive: whether its loops still run (False once one of them died)."""

    def __init__(
        self, registry: CollectorRegistry, ready: Callable[[], bool], alive: Callable[[], bool]
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._alive = alive
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_port=False, limit=MAX_REQUEST_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, content_type, body = self._answer(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/healthz":
            return _probe(self._alive(), b"ok\n", b"a controller loop stopped\n")
        if path == "/readyz":
            return _probe(self._ready(), b"ready\n", b"not ready: first sync or snapshot pending\n")
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return "404 Not Found", "text/plain", b"not found\n"


def _probe(ok: bool, yes: bytes, no: bytes) -> tuple[str, str, bytes]:
    return ("200 OK", "text/plain", yes) if ok else ("503 Service Unavailable", "text/plain", no)
