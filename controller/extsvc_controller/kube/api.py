"""Raw JSON list and watch requests, on top of a lightkube ``AsyncClient``.

lightkube's own ``watch()`` reconnects by itself and hides it (so restarts cannot be counted or
backed off), cannot ask for bookmarks, decodes every object into a model and reads lines of any
length. Here one call is one HTTP request: the caller decides what a stream end, a 410 or an error
means. Requests are still built by lightkube (URL, auth, TLS, timeouts from its config), through
its (undocumented) ``GenericAsyncClient``; lightkube is pinned ``<2`` in pyproject for that reason.

Everything read is bounded: a list page by ``limit`` and by bytes, a watch event by bytes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

import httpx2
from lightkube import AsyncClient

from .kinds import Kind, as_dict

ALL_NAMESPACES = "*"


class ApiStatusError(Exception):
    """An HTTP error status, or an ``ERROR`` watch event, from the API server."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


class Gone(ApiStatusError):
    """410: the resourceVersion is too old to resume from; list again."""


class NotServed(ApiStatusError):
    """404 on a list: the API server does not serve this kind (its CRD is not installed)."""


class TooLarge(Exception):
    """A response or event over the byte cap."""


class _Request(Protocol):
    params: dict[str, Any]
    timeout: httpx2.Timeout | None


class _Generic(Protocol):
    """The part of lightkube's ``GenericAsyncClient`` used here, typed."""

    _watch_timeout: httpx2.Timeout  # its client's timeouts without the read timeout

    def prepare_request(
        self, method: str, res: type[Any], *, namespace: str | None, watch: bool, params: dict[str, Any]
    ) -> _Request: ...

    def build_adapter_request(self, br: _Request) -> httpx2.Request: ...

    async def send(self, req: httpx2.Request, stream: bool = False) -> httpx2.Response: ...


def _error(resp: httpx2.Response, body: bytes) -> ApiStatusError:
    reason = ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            reason = str(doc.get("reason") or "")[:100]
    except ValueError:
        pass
    cls = {410: Gone, 404: NotServed}.get(resp.status_code, ApiStatusError)
    return cls(resp.status_code, reason)


def status_of(event_object: Any) -> ApiStatusError:
    """The error an ``ERROR`` watch event carries (a ``Status`` object)."""
    code = event_object.get("code") if isinstance(event_object, dict) else None
    code = code if isinstance(code, int) else 500
    reason = str(event_object.get("reason") or "")[:100] if isinstance(event_object, dict) else ""
    return (Gone if code == 410 else ApiStatusError)(code, reason)


class Api:
    """:param max_page_bytes: cap on one list response. :param max_event_bytes: cap on one watch
    line (one object); over it the watch fails (and is retried) rather than buffering without end."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        page_size: int = 500,
        max_page_bytes: int = 64 << 20,
        max_event_bytes: int = 4 << 20,
        watch_timeout: int = 300,
        watch_idle_s: float = 120.0,
    ) -> None:
        self._generic = cast(_Generic, client._client)
        self.watch_idle_s = watch_idle_s
        self.page_size = page_size
        self.max_page_bytes = max_page_bytes
        self.max_event_bytes = max_event_bytes
        self.watch_timeout = watch_timeout

    def _request(self, kind: Kind, namespace: str, watch: bool, params: dict[str, Any]) -> httpx2.Request:
        br = self._generic.prepare_request(
            "list", kind.resource(), namespace=namespace, watch=watch, params=params
        )
        if watch:
            # A watch is quiet while nothing changes: the client's read timeout would end every
            # quiet watch; ``watch_idle_s`` of silence (no event, no bookmark) does instead, so that
            # a connection to an API server that vanished without closing it is still given up.
            timeout = httpx2.Timeout(self._generic._watch_timeout)
            timeout.read = self.watch_idle_s
            br.timeout = timeout
        return self._generic.build_adapter_request(br)

    async def list_page(
        self, kind: Kind, namespace: str, cont: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None, str | None]:
        """One page: (items, the list's resourceVersion, the continue token or None)."""
        req = self._request(kind, namespace, False, {"limit": self.page_size, "continue": cont})
        resp = await self._generic.send(req, stream=True)
        try:
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > self.max_page_bytes:
                    raise TooLarge(f"{kind.kind} list page over {self.max_page_bytes} bytes")
            if resp.status_code >= 400:
                raise _error(resp, bytes(body))
        finally:
            await resp.aclose()
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ApiStatusError(500, "not a list")
        meta = as_dict(doc.get("metadata"))
        items = [i for i in (doc.get("items") or []) if isinstance(i, dict)]
        rv, nxt = meta.get("resourceVersion"), meta.get("continue")
        rv = rv if isinstance(rv, str) and rv else None
        return items, rv, (nxt if isinstance(nxt, str) and nxt else None)

    async def watch(
        self, kind: Kind, namespace: str, resource_version: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it. Bookmarks are asked for."""
        params = {
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": self.watch_timeout,
        }
        req = self._request(kind, namespace, True, params)
        resp = await self._generic.send(req, stream=True)
        try:
            if resp.status_code >= 400:
                body = b""
                async for chunk in resp.aiter_bytes():
                    body = (body + chunk)[:65536]
                raise _error(resp, body)
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        yield _event(line)
                if len(buf) > self.max_event_bytes:
                    raise TooLarge(f"{kind.kind} watch event over {self.max_event_bytes} bytes")
            if buf.strip():
                yield _event(bytes(buf))
        finally:
            await resp.aclose()


def _event(line: bytes) -> dict[str, Any]:
    doc = json.loads(line)
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise ApiStatusError(500, "malformed watch event")
    return doc
