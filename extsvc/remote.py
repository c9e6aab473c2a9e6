"""Bounded HTTP fetches for plugins: a size cap, connect/read timeouts and a hard total deadline.

Part of the plugin API (the built-in ``jwt`` and ``oauth2-introspection`` plugins fetch JWKS
documents, OIDC discovery documents and introspection answers through exactly this). httpx's own
timeouts apply per operation -- a server that sends one byte a second never trips a read timeout
-- and ``response.content`` buffers whatever the server sends. :func:`fetch_bytes` instead:

- streams the body and stops reading (closing the connection) as soon as it would exceed
  ``max_bytes``; a ``Content-Length`` above the cap is refused before any of the body is read;
- bounds the whole fetch (connecting, sending, waiting for the headers, the whole body) by
  ``timeout_total_s`` with :func:`asyncio.timeout`, on top of httpx's connect and read timeouts;
- asks for an uncompressed answer, and decompresses a gzip/deflate one (sent regardless) under the
  same cap, so a small compressed body cannot expand into a large one;
- reads no body of an answer whose status is not 2xx (redirects are not followed);
- raises one :class:`RemoteFetchError` subclass per way of failing, and is cancellable at any
  point (cancelling the awaiting task closes the connection).

Example::

    from extsvc import RemoteFetchError, RemoteFetchMetrics, fetch_json

    class MyStep:
        def __init__(self, config, ctx):
            self._client = httpx.AsyncClient()
            self._fetches = RemoteFetchMetrics(ctx.metrics)

        async def start(self):
            self._document = await fetch_json(
                self._client, "GET", "https://idp.example/doc.json",
                max_bytes=64 * 1024, timeout_total_s=3, metrics=self._fetches,
            )
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from extsvc.errors import ExtsvcError

if TYPE_CHECKING:
    from extsvc.plugin.context import PluginMetrics

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_READ_TIMEOUT_S",
    "RemoteFetchError",
    "RemoteFetchMetrics",
    "RemoteInvalidContent",
    "RemoteStatusError",
    "RemoteTimeout",
    "RemoteTooLarge",
    "RemoteUnreachable",
    "fetch_bytes",
    "fetch_json",
    "safe_url",
]

#: Longest wait for a TCP (and TLS) connection, or for a free pooled one; capped by the total.
DEFAULT_CONNECT_TIMEOUT_S = 2.0
#: Longest wait for the next bytes from the server (each read); capped by the total.
DEFAULT_READ_TIMEOUT_S = 5.0


class RemoteFetchError(ExtsvcError):
    """A bounded fetch that produced no usable answer. ``reason`` is a short label for metrics
    and logs (``too-large``, ``timeout``, ``status``, ``unreachable``, ``invalid``)."""

    reason: ClassVar[str] = "error"

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}")


class RemoteTooLarge(RemoteFetchError):
    """The answer is longer than the cap; reading stopped at the cap (or, when the server declared
    a longer ``Content-Length``, before the body)."""

    reason = "too-large"

    def __init__(self, where: str, max_bytes: int, received: int, declared: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.received = received
        detail = (
            f"declared Content-Length {declared}" if declared is not None
            else f"stopped reading after {received} bytes"
        )
        super().__init__(where, f"the answer is larger than the {max_bytes}-byte cap ({detail})")


class RemoteTimeout(RemoteFetchError):
    """A connect or read timeout, or the total deadline, passed before the answer was complete."""

    reason = "timeout"


class RemoteStatusError(RemoteFetchError):
    """The server answered with a status other than 2xx (its body is not read)."""

    reason = "status"

    def __init__(self, where: str, status: int) -> None:
        self.status = status
        super().__init__(where, f"HTTP status {status}")


class RemoteUnreachable(RemoteFetchError):
    """No answer: the connection was refused or broke, TLS failed, the URL or protocol is bad."""

    reason = "unreachable"


class RemoteInvalidContent(RemoteFetchError):
    """An answer that arrived but cannot be used (an unsupported encoding, not a JSON object)."""

    reason = "invalid"


class RemoteFetchMetrics:
    """Plugin counters for remote fetches (``extsvc_plugin_remote_*_total{plugin,policy}``).

    Build one per step at construction time (``RemoteFetchMetrics(ctx.metrics)``) and pass it to
    :func:`fetch_bytes` / :func:`fetch_json`.
    """

    def __init__(self, metrics: PluginMetrics) -> None:
        self.fetches = metrics.counter("remote_fetches", "Remote fetches started")
        self.failures = metrics.counter("remote_fetch_failures", "Remote fetches that failed")
        self.too_large = metrics.counter(
            "remote_too_large", "Remote answers refused for exceeding their size cap"
        )
        self.timeouts = metrics.counter(
            "remote_timeouts", "Remote fetches cut off by a connect, read or total timeout"
        )

    def failed(self, error: RemoteFetchError) -> None:
        self.failures.inc()
        if isinstance(error, RemoteTooLarge):
            self.too_large.inc()
        elif isinstance(error, RemoteTimeout):
            self.timeouts.inc()


def safe_url(url: str) -> str:
    """``scheme://host[:port]/path`` of a URL, for logs: no user info, no query, no fragment."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


async def fetch_bytes(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_bytes: int,
    timeout_total_s: float,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str] | None = None,
    metrics: RemoteFetchMetrics | None = None,
) -> bytes:
    """The body of a 2xx answer, at most ``max_bytes`` long, within ``timeout_total_s``.

    ``data`` is sent form-encoded. The connect and read timeouts are capped by the total.

    :raises RemoteTooLarge, RemoteTimeout, RemoteStatusError, RemoteUnreachable,
        RemoteInvalidContent: (all :class:`RemoteFetchError`) -- never httpx's own exceptions.
    """
    if max_bytes < 0 or timeout_total_s <= 0:
        raise ValueError("max_bytes must be >= 0 and timeout_total_s > 0")
    where = f"{method} {safe_url(url)}"
    connect = min(connect_timeout_s, timeout_total_s)
    read = min(read_timeout_s, timeout_total_s)
    if metrics is not None:
        metrics.fetches.inc()
    try:
        async with asyncio.timeout(timeout_total_s):
            return await _stream(
                client, method, url, where, max_bytes,
                httpx.Timeout(connect=connect, read=read, write=read, pool=timeout_total_s),
                {"accept-encoding": "identity", **(headers or {})},
                data,
            )
    except RemoteFetchError as exc:
        error: RemoteFetchError = exc
    except TimeoutError:  # asyncio.timeout: the total deadline (a slow or dripping answer)
        error = RemoteTimeout(where, f"no complete answer within {timeout_total_s:g} s (total deadline)")
    except httpx.TimeoutException as exc:
        error = RemoteTimeout(where, f"{_kind(exc)} (connect {connect:g} s, read {read:g} s)")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        error = RemoteUnreachable(where, f"{_kind(exc)}: {exc}" if str(exc) else _kind(exc))
    if metrics is not None:
        metrics.failed(error)
    raise error


async def fetch_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_bytes: int,
    timeout_total_s: float,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str] | None = None,
    metrics: RemoteFetchMetrics | None = None,
) -> dict[str, Any]:
    """:func:`fetch_bytes`, parsed as a JSON object (anything else is :class:`RemoteInvalidContent`)."""
    body = await fetch_bytes(
        client, method, url, max_bytes=max_bytes, timeout_total_s=timeout_total_s,
        connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
        headers={"accept": "application/json", **(headers or {})}, data=data, metrics=metrics,
    )
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        error = RemoteInvalidContent(f"{method} {safe_url(url)}", f"not JSON ({type(exc).__name__})")
    else:
        if isinstance(document, dict):
            return document
        error = RemoteInvalidContent(f"{method} {safe_url(url)}", "the answer is not a JSON object")
    if metrics is not None:
        metrics.failed(error)
    raise error


async def _stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    where: str,
    max_bytes: int,
    limits: httpx.Timeout,
    headers: dict[str, str],
    data: Mapping[str, str] | None,
) -> bytes:
    async with client.stream(
        method, url, headers=headers, data=data, timeout=limits, follow_redirects=False
    ) as response:
        if not response.is_success:
            raise RemoteStatusError(where, response.status_code)
        declared = _content_length(response)
        if declared is not None and declared > max_bytes:
            raise RemoteTooLarge(where, max_bytes, 0, declared)
        decoder = _Decoder(response.headers.get("content-encoding", ""), where)
        body = bytearray()
        raw = 0
        async for chunk in response.aiter_raw():
            raw += len(chunk)
            if raw > max_bytes:  # compressed or not: the cap applies to what crosses the wire too
                raise RemoteTooLarge(where, max_bytes, raw)
            body += decoder.decode(chunk, max_bytes - len(body))
            if len(body) > max_bytes:
                raise RemoteTooLarge(where, max_bytes, len(body))
        body += decoder.flush()
        if len(body) > max_bytes:
            raise RemoteTooLarge(where, max_bytes, len(body))
        return bytes(body)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


class _Decoder:
    """A Content-Encoding decoder that never produces more than the room left under the cap."""

    def __init__(self, encoding: str, where: str) -> None:
        name = encoding.strip().lower()
        self._where = where
        self._zlib: Any = None
        if name in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif name == "deflate":
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS)
        elif name not in ("", "identity"):
            raise RemoteInvalidContent(where, f"unsupported Content-Encoding {name[:40]!r}")

    def decode(self, chunk: bytes, room: int) -> bytes:
        if self._zlib is None:
            return chunk
        try:
            # at most room + 1 bytes: one more than fits is enough to know it does not
            return bytes(self._zlib.decompress(chunk, max(room, 0) + 1))
        except zlib.error as exc:
            raise RemoteInvalidContent(self._where, f"corrupt compressed body ({exc})") from exc

    def flush(self) -> bytes:
        if self._zlib is None:
            return b""
        try:
            return bytes(self._zlib.flush())
        except zlib.error as exc:
            raise RemoteInvalidContent(self._where, f"corrupt compressed body ({exc})") from exc


def _kind(exc: BaseException) -> str:
    """``ConnectError`` -> ``connect error``: the httpx exception's kind, for messages."""
    name = type(exc).__name__
    return "".join(f" {c.lower()}" if c.isupper() else c for c in name).strip()
