"""A lean, pipelining Redis client for the request path: one connection, RESP2, asyncio.Protocol.

Why not redis-py here: its asyncio client checks a connection out of a pool, writes, awaits the
reply and checks it back in for every command, which cost ~300 µs of CPU per rate-limit RPC in
``bench/ratelimit_bench.py``. Redis executes commands one at a time anyway, so this client keeps one
connection, writes the commands issued during one event-loop turn together at the start of the
next (one ``write``, and one read for Redis), and a parser resolves the waiting futures in order as
replies arrive. One watchdog timer, not one per command, bounds how long a command waits: by the
client's timeout, or earlier by the caller's deadline (the RPC's), so callers need no timer of
their own.

Failure behaviour: a lost connection fails every waiting command at once; the next command
reconnects, but at most one connect attempt runs at a time and a failed attempt is not retried
for ``retry_interval_s`` (commands fail fast meanwhile), so a dead Redis costs nothing per request
beyond the failure-mode answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import socket
import time
from collections import deque
from collections.abc import Sequence
from time import perf_counter
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from extsvc.errors import StoreError

Reply = Any

#: the resolution of event-loop timers (both loops): the shortest pipeline hold
_TIMER_TICK_S = 0.001


class RespError(StoreError):
    """An error reply (``-ERR ...``) from Redis."""


class _Incomplete(Exception):
    """The buffer ends inside a reply; wait for more bytes."""


def encode(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse(buffer: bytes, pos: int) -> tuple[Reply, int]:
    """One reply starting at ``pos``: (value, position after it). Raises :class:`_Incomplete`."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buffer[pos]
    if kind == 0x3A:  # ":" integer
        return int(buffer[pos + 1:end]), end + 2
    if kind == 0x2A:  # "*" array
        count = int(buffer[pos + 1:end])
        pos = end + 2
        if count < 0:
            return None, pos
        items: list[Any] = []
        find = buffer.find
        for _ in range(count):
            # Integers, and arrays of integers, inline: the rate-limit script answers an array
            # of {x, y} pairs, and a call per element was most of the cost of reading it.
            end = find(b"\r\n", pos)
            if end < 0:
                raise _Incomplete
            kind = buffer[pos]
            if kind == 0x3A:
                items.append(int(buffer[pos + 1:end]))
                pos = end + 2
                continue
            if kind == 0x2A:
                inner = int(buffer[pos + 1:end])
                at = end + 2
                numbers: list[int] = []
                for _ in range(inner):
                    end = find(b"\r\n", at)
                    if end < 0:
                        raise _Incomplete
                    if buffer[at] != 0x3A:
                        break
                    numbers.append(int(buffer[at + 1:end]))
                    at = end + 2
                else:
                    if inner >= 0:
                        items.append(numbers)
                        pos = at
                        continue
            item, pos = parse(buffer, pos)  # anything else: the general way
            items.append(item)
        return items, pos
    line = buffer[pos + 1:end]
    pos = end + 2
    if kind == 0x24:  # "$" bulk string
        size = int(line)
        if size < 0:
            return None, pos
        if len(buffer) < pos + size + 2:
            raise _Incomplete
        return buffer[pos:pos + size], pos + size + 2
    if kind == 0x2B:  # "+" simple string
        return line.decode(), pos
    if kind == 0x2D:  # "-" error
        return RespError(line.decode("utf-8", "replace")), pos
    raise StoreError(f"redis: unexpected reply type {bytes([kind])!r}")


class _Connection(asyncio.Protocol):
    """:param window_s: how long a command may wait for others to share its write when the
        connection is busy (0: until the next event-loop turn); ``limit``: how many may wait."""

    def __init__(self, window_s: float = 0.0, limit: int = 64) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self._buffer = b""
        self._outgoing: list[bytes] = []
        self._window = window_s
        self._limit = limit
        self._timer: asyncio.TimerHandle | None = None
        self._last_write = -1e9  # perf_counter() of the last write (kept with a window only)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, only alike).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        try:
            while pos < len(buffer):
                reply, pos = parse(buffer, pos)
                if not self.waiting:  # a reply nobody asked for: the stream is out of step
                    raise StoreError("redis: unexpected reply")
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except _Incomplete:
            pass
        except (StoreError, ValueError) as exc:
            self._fail(StoreError(f"redis: protocol error: {exc}"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._buffer = buffer[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StoreError(f"redis: connection lost ({exc or 'closed by server'})"))

    def _fail(self, error: StoreError) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outgoing = []
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, payload: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self.waiting.append(future)
        # Commands issued during one event-loop turn leave in one write (one send() here, one
        # read and one reply write in Redis), flushed at the start of the next turn -- or, with
        # a pipeline window, when the window closes or ``limit`` commands are waiting: requests
        # arriving one per turn (the usual case) then share writes too, for up to the window's
        # added latency.
        # The window only applies while the connection is busy (the previous write left less
        # than a window ago): a request arriving at a quiet moment is not held at all.
        outgoing = self._outgoing
        outgoing.append(payload)
        if len(outgoing) == 1:
            window = self._window
            if window and perf_counter() - self._last_write < window:
                # Event-loop timers tick in milliseconds (asyncio rounds a delay up to the next
                # one, uvloop down -- 0.5 ms would be "now"): the same hold on both loops.
                self._timer = loop.call_later(max(window, _TIMER_TICK_S), self._flush)
            else:
                loop.call_soon(self._flush)
        elif self._timer is not None and len(outgoing) >= self._limit:
            self._timer.cancel()
            self._flush()
        return future

    def _flush(self) -> None:
        self._timer = None
        outgoing, self._outgoing = self._outgoing, []
        if not outgoing:
            return
        if self._window:
            self._last_write = perf_counter()  # precise (uvloop's loop.time() is per turn, in ms)
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(b"".join(outgoing) if len(outgoing) > 1 else outgoing[0])


class PipelinedRedis:
    """``await client.call("EVALSHA", sha, 2, k1, k2, ...)`` over one pipelined connection.

    :param url: ``redis://[:password@]host:port[/db]`` (``password_file`` wins over the URL's).
    :param timeout_s: the bound of one connect and of one command.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        password: str | None = None,
        retry_interval_s: float = 0.2,
        pipeline_window_s: float = 0.0,
        pipeline_limit: int = 64,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", ""):
            raise StoreError(f"redis: unsupported URL scheme {parts.scheme!r} (use redis://)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self._password = password if password is not None else (
            unquote(parts.password) if parts.password else None
        )
        self._username = unquote(parts.username) if parts.username else None
        self._db = int(parts.path.strip("/") or 0)
        self._timeout = timeout_s
        self._retry_interval = retry_interval_s
        self._pipeline = (pipeline_window_s, pipeline_limit)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._failed_at = -1e9
        # Command deadlines, in send order: with one timeout (and callers' deadlines that come
        # from RPCs with the same budget) that is also deadline order, so one timer for the
        # earliest pending one covers them all. A deadline earlier than the last one queued goes
        # to a heap instead, so it is never held up behind later ones.
        self._deadlines: deque[tuple[float, asyncio.Future[Reply]]] = deque()
        self._early: list[tuple[float, int, asyncio.Future[Reply]]] = []
        self._sequence = itertools.count()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._last_error = ""

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        transport, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(*self._pipeline), self.host, self.port),
            self._timeout,
        )
        with contextlib.suppress(OSError):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        setup: list[tuple[str, list[bytes | str | int]]] = []
        if self._password is not None:
            auth: list[bytes | str | int] = [*([self._username] if self._username else [])]
            auth.append(self._password)
            setup.append(("AUTH", auth))
        if self._db:
            setup.append(("SELECT", [self._db]))
        for name, args in setup:
            reply = await asyncio.wait_for(conn.send(encode([name, *args])), self._timeout)
            if isinstance(reply, RespError):
                transport.close()
                raise StoreError(f"redis: {name} failed: {reply}")
        return conn

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            if time.monotonic() - self._failed_at < self._retry_interval:
                raise StoreError(f"redis: unavailable ({self._last_error})")
            self._connecting = asyncio.ensure_future(self._connect())
        task = self._connecting
        try:
            conn = await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, StoreError) as exc:
            if self._connecting is task:
                self._connecting = None
                self._failed_at = time.monotonic()
                self._last_error = str(exc) or type(exc).__name__
            raise StoreError(f"redis: cannot connect to {self.host}:{self.port}: {exc}") from exc
        if self._connecting is task:
            self._connecting = None
            self._conn = conn
        return conn

    async def call(self, *args: bytes | str | int, deadline: float | None = None) -> Reply:
        """Send one command and return its reply; an error reply raises :class:`RespError`.

        :param deadline: event-loop time by which the reply must have come (else StoreError),
            when that is earlier than the client's own timeout.
        """
        return await self.call_encoded(encode(args), deadline)

    async def call_encoded(self, payload: bytes, deadline: float | None = None) -> Reply:
        """:meth:`call` for a command already encoded (see :func:`encode`)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        future = conn.send(payload)
        # Bounded by the watchdog (_expire) rather than asyncio.wait_for or a timer armed and
        # cancelled per command; the reply of a timed-out command is still read in order and
        # dropped.
        loop = asyncio.get_running_loop()
        when = loop.time() + self._timeout
        if deadline is not None and deadline < when:
            when = deadline
        deadlines = self._deadlines
        if deadlines and when < deadlines[-1][0]:
            heapq.heappush(self._early, (when, next(self._sequence), future))
        else:
            deadlines.append((when, future))
        watchdog = self._watchdog
        if watchdog is None or when < self._watchdog_at:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = loop.call_at(when, self._expire)
            self._watchdog_at = when
        reply = await future
        if isinstance(reply, RespError):
            raise reply
        return reply

    def _expire(self) -> None:
        """Fail the commands past their deadline; re-arm for the earliest one still waiting."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = StoreError(
            f"redis: no reply within {self._timeout * 1000:.0f} ms or before the RPC's deadline"
        )
        following: float | None = None
        deadlines = self._deadlines
        while deadlines:
            when, future = deadlines[0]
            if not future.done():
                if when > now:
                    following = when
                    break
                future.set_exception(late)
            deadlines.popleft()
        early = self._early
        while early and (early[0][0] <= now or early[0][2].done()):
            _, _, future = heapq.heappop(early)
            if not future.done():
                future.set_exception(late)
        if early and (following is None or early[0][0] < following):
            following = early[0][0]
        if following is not None:
            self._watchdog = loop.call_at(following, self._expire)
            self._watchdog_at = following

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
