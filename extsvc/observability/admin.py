"""The HTTP admin listener: ``/healthz``, ``/readyz``, ``/metrics``, ``/status``, and the door
to the admin gRPC API.

A deliberately tiny HTTP/1.1 server on asyncio's socket calls (GET and HEAD, one request per
connection), so the admin port needs no web framework. It binds 127.0.0.1 by default. A
connection that opens with the HTTP/2 preface (a gRPC client: ``extsvc tail``) is handed, bytes
both ways, to the admin gRPC server of this worker (:mod:`extsvc.observability.admin_api`),
which listens on a Unix socket only: one port, one exposure, for both.

Everything a client controls is bounded (docs/hardening.md, "Admin listener"):

- at most ``max_connections`` connections at once; a connection past the cap takes the place of
  the oldest one still sending its request (a probe that sends at once is answered although idle
  connections fill the cap), or is closed at once when every slot is answering;
- the request (line and headers) must arrive within ``request_timeout_s``, and fit in
  :data:`MAX_REQUEST_LINE` / :data:`MAX_HEAD` bytes and :data:`MAX_HEADERS` lines: else 431 (400
  for a malformed line), answered without a traceback;
- ``accept()`` failing for want of file descriptors (EMFILE, ENFILE) closes the oldest idle admin
  connection, is retried every :data:`ACCEPT_RETRY_S` and logged once per 10 s;
- ``/metrics`` is rendered in a worker thread (:meth:`Metrics.exposition_async`): a scrape of a
  large registry does not hold up probes or requests.

Each refusal counts ``extsvc_admin_errors_total{reason}`` (``too-large``, ``bad-request``,
``timeout``, ``overloaded``, ``accept``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from extsvc.observability.health import HealthState
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics

log = logging.getLogger(__name__)

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    431: "Request Header Fields Too Large", 503: "Service Unavailable",
}
#: Longest request line, and longest request head (line and headers), in bytes.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 16 * 1024
#: Most header lines in a request.
MAX_HEADERS = 100
#: Seconds an answer may take to send (a large /metrics to a slow reader).
WRITE_TIMEOUT_S = 30.0
#: After an error answer, what is still read (and dropped) so that closing does not reset the
#: connection before the client has read the answer: at most this long and this many bytes.
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024
#: Seconds between accept() attempts while the process is out of file descriptors.
ACCEPT_RETRY_S = 0.1
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO})
#: What an HTTP/2 client sends first (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_ERROR_REASONS = ("too-large", "bad-request", "timeout", "overloaded", "accept")


class _TooLarge(Exception):
    pass


class _Connection:
    __slots__ = ("reading", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reading = True  # still receiving its request: may be cut for a newcomer


class AdminServer:
    def __init__(
        self,
        health: HealthState,
        metrics: Metrics,
        status: Callable[[], dict[str, object]] | None = None,
        *,
        max_connections: int = 64,
        request_timeout_s: float = 5.0,
        grpc_socket: Callable[[], str | None] | None = None,
    ) -> None:
        """:param grpc_socket: where HTTP/2 connections go (the admin gRPC server's Unix
            socket); None, or a callable answering None: they get a 400 like any bad request."""
        self._grpc_socket = grpc_socket or (lambda: None)
        self._health = health
        self._metrics = metrics
        self._status = status or (lambda: {})
        self._max = max_connections
        self._timeout = request_timeout_s
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        #: open connections, oldest first (dicts keep insertion order)
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._errors = {r: metrics.admin_errors.labels(r) for r in _ERROR_REASONS}
        self._throttle = LogThrottle()
        self.port = 0

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    async def start(self, address: str, *, reuse_port: bool = False) -> None:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # --workers: every worker answers on the same admin port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host.strip("[]") or "0.0.0.0", int(port)))  # noqa: S104 (operator's choice)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def stop(self) -> None:
        tasks = [t for t in (self._acceptor, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._acceptor = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- connections ----------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:  # reset before it was accepted: nothing to do
                    continue
                self._errors["accept"].inc()
                held = self._throttle.allow(f"accept:{exc.errno}")
                if held is not None:
                    log.error("admin listener: accept() failed: %s (%d more since the last "
                              "report); retrying", exc, held)
                if exc.errno in _OUT_OF_FDS and self._cut_oldest_idle():
                    # Out of descriptors: an idle admin connection gives one back as soon as
                    # its task has run (the next loop turn), then accept() again.
                    await asyncio.sleep(0)
                else:
                    await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            sock.setblocking(False)
            if len(self._connections) >= self._max and not self._cut_oldest_idle():
                self._errors["overloaded"].inc()  # every slot is answering: no room
                sock.close()
                continue
            task = loop.create_task(self._handle(sock))
            self._connections[task] = _Connection(sock)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)

    def _cut_oldest_idle(self) -> bool:
        """Close the oldest connection still sending its request; False when there is none."""
        for task, connection in self._connections.items():
            if connection.reading and not task.done():
                connection.reading = False
                self._errors["overloaded"].inc()
                task.cancel()
                return True
        return False

    async def _handle(self, sock: socket.socket) -> None:
        try:
            await self._serve(sock)
        except (OSError, asyncio.CancelledError):
            pass  # the client went away, or the connection was cut (counted where cut)
        except Exception:  # a bug here must not flood the log: once per 10 s per kind
            held = self._throttle.allow("handler")
            if held is not None:
                log.exception("admin request failed (%d more since the last report)", held)
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                head = await self._read_head(sock)
        except TimeoutError:
            self._errors["timeout"].inc()
            return
        except _TooLarge:
            self._errors["too-large"].inc()
            await self._answer(sock, 431, "text/plain", b"request too large\n", linger=True)
            return
        connection = self._connections.get(asyncio.current_task())  # type: ignore[arg-type]
        if connection is not None:
            connection.reading = False
        if head is None:  # closed before sending anything
            return
        if head.startswith(H2_PREFACE[:14]):
            target = self._grpc_socket()
            if target is not None:
                await self._pipe(sock, head, target)
                return
        parts = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) not in (2, 3):
            self._errors["bad-request"].inc()
            await self._answer(sock, 400, "text/plain", b"bad request\n", linger=True)
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        status, ctype, body = await self._route(method, target)
        await self._answer(
            sock, status, ctype, body, head_only=method == "HEAD", linger=status == 405
        )

    async def _read_head(self, sock: socket.socket) -> bytes | None:
        """The request line and headers (without the blank line); None for a connection closed
        before a byte came. :raises _TooLarge: past the line, head or header-count bounds."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        while True:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:  # EOF: a request line without the blank line still counts
                if not buf:
                    return None
                return bytes(buf)
            buf += chunk
            line_end = buf.find(b"\n")
            if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(buf) > MAX_REQUEST_LINE):
                raise _TooLarge
            ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
            end = min(ends) if ends else -1
            head = buf if end < 0 else buf[:end]
            if len(head) > MAX_HEAD or head.count(b"\n") > MAX_HEADERS:
                raise _TooLarge
            if end >= 0:  # everything read: an HTTP/2 client's first frames follow the head
                return bytes(buf)

    async def _pipe(self, sock: socket.socket, first: bytes, target: str) -> None:
        """Relay a connection to the Unix socket ``target``, bytes both ways, until either
        side closes (the HTTP/2 connection of a gRPC client to the admin API)."""
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_unix_connection(target)
        except OSError as exc:
            log.warning("admin gRPC API unreachable at %s: %s", target, exc)
            return
        writer.write(first)

        async def upstream() -> None:
            while chunk := await loop.sock_recv(sock, 65536):
                writer.write(chunk)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        async def downstream() -> None:
            while chunk := await reader.read(65536):
                await loop.sock_sendall(sock, chunk)

        tasks = [loop.create_task(upstream()), loop.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    async def _answer(
        self,
        sock: socket.socket,
        status: int,
        ctype: str,
        body: bytes,
        *,
        head_only: bool = False,
        linger: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await loop.sock_sendall(sock, head if head_only else head + body)
        except TimeoutError:
            self._errors["timeout"].inc()
            return
        if linger:  # the client may still be sending: read it away, so that close() sends FIN
            with contextlib.suppress(OSError, TimeoutError):
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(LINGER_S):
                    dropped = 0
                    while dropped < LINGER_BYTES:
                        chunk = await loop.sock_recv(sock, 65536)
                        if not chunk:
                            break
                        dropped += len(chunk)

    async def _route(self, method: str, target: str) -> tuple[int, str, bytes]:
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
            body = await self._metrics.exposition_async()
            return 200, "text/plain; version=0.0.4; charset=utf-8", body
        if target == "/status":
            status: Any = self._status()
            return 200, "application/json", json.dumps(status, indent=2).encode() + b"\n"
        return 404, "text/plain", b"not found\n"
