"""The HTTP admin listener: ``/healthz``, ``/readyz``, ``/metrics``.

A deliberately tiny HTTP/1.1 server on asyncio (GET only, one request per connection), so the
admin port needs no web framework. It binds 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable

from extsvc.observability.health import HealthState
from extsvc.observability.metrics import Metrics

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AdminServer:
    def __init__(
        self,
        health: HealthState,
        metrics: Metrics,
        status: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self._health = health
        self._metrics = metrics
        self._status = status or (lambda: {})
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, address: str, *, reuse_port: bool = False) -> None:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # --workers: every worker answers on the same admin port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]") or "0.0.0.0", int(port)))  # noqa: S104 (operator's choice)
        self._server = await asyncio.start_server(self._handle, sock=sock)
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            status, ctype, body = self._route(method, target)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, method: str, target: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if target == "/healthz":
            return (200, "text/plain", b"ok\n") if self._health.alive else (
                503, "text/plain", b"stopping\n"
            )
        if target == "/readyz":
            if self._health.ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", f"not ready: {self._health.reason}\n".encode()
        if target == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics.exposition()
        if target == "/status":
            return 200, "application/json", json.dumps(self._status(), indent=2).encode() + b"\n"
        return 404, "text/plain", b"not found\n"
