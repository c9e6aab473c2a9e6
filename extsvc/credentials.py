"""Building blocks for authentication plugins: where a credential is, a TTL cache, identity forwarding.

Plugin API, imported as ``from extsvc.credentials import ...``: the names in ``__all__`` are what
the built-in ``jwt``, ``api-key``, ``basic-auth`` and ``oauth2-introspection`` plugins are built
from, so a third-party authorizer that uses them finds, strips, hashes and forwards credentials
exactly as the built-ins do (docs/plugins.md, "Credential helpers"). Other names here are
internal. They live in their own module rather than in :mod:`extsvc` because only authorizers
that take a credential need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from extsvc.plugin.check import CheckContext
from extsvc.types import HeaderName

__all__ = [
    "BEARER",
    "CredentialSource",
    "Forward",
    "TtlCache",
    "WatchedFile",
    "credential_hash",
    "find_credential",
    "removal",
    "tls_context",
]

V = TypeVar("V")

class CredentialSource(BaseModel):
    """Where to find a credential: exactly one of ``header``, ``cookie``, ``query``.

    ``prefix`` (header only) is matched case-insensitively and stripped, e.g. ``"Bearer "``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    header: HeaderName | None = None
    prefix: str | None = None
    cookie: str | None = None
    query: str | None = None

    @model_validator(mode="after")
    def _one(self) -> CredentialSource:
        if sum(v is not None for v in (self.header, self.cookie, self.query)) != 1:
            raise ValueError("set exactly one of header, cookie, query")
        if self.prefix is not None and self.header is None:
            raise ValueError("prefix only applies to header")
        return self

    def describe(self) -> str:
        if self.header:
            return f"header {self.header}" + (f" ({self.prefix.strip()})" if self.prefix else "")
        return f"cookie {self.cookie}" if self.cookie else f"query parameter {self.query}"


BEARER = CredentialSource(header="authorization", prefix="Bearer ")


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (Envoy joins several with ``; ``)."""
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def find_credential(
    request: CheckContext, sources: Iterable[CredentialSource]
) -> tuple[str, CredentialSource] | None:
    """The first credential present in ``sources`` (in order), with the source it came from.

    A header with the wrong prefix (``Basic ...`` where ``Bearer`` is expected) does not count as
    present, so a later source can still match.
    """
    for source in sources:
        value: str | None
        if source.header is not None:
            value = request.headers.get(source.header)
            if value is not None and source.prefix is not None:
                if value[: len(source.prefix)].lower() != source.prefix.lower():
                    continue
                value = value[len(source.prefix):].strip()
        elif source.cookie is not None:
            header = request.headers.get("cookie")
            value = cookie_value(header, source.cookie) if header else None
        else:
            values = request.query_params.get(source.query or "")
            value = values[0] if values else None
        if value:
            return value, source
    return None


def removal(
    request: CheckContext, source: CredentialSource
) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """What strips the credential before the request goes upstream.

    Returns ``(upstream_set, upstream_remove, query_remove)`` for :meth:`Decision.allow`. A cookie
    credential rewrites the ``Cookie`` header without it (removing the header if nothing is left).
    """
    if source.header is not None:
        return {}, (source.header,), ()
    if source.query is not None:
        return {}, (), (source.query,)
    header = request.headers.get("cookie", "")
    kept = [
        p.strip() for p in header.split(";")
        if p.strip() and p.strip().partition("=")[0] != source.cookie
    ]
    if kept:
        return {"cookie": "; ".join(kept)}, (), ()
    return {}, ("cookie",), ()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS client context (httpx's defaults) shared by every plugin HTTP client.

    Building one loads the CA bundle (~40 ms); sharing it keeps config reloads cheap.
    """
    return httpx.create_ssl_context()


def credential_hash(credential: str | bytes) -> bytes:
    """SHA-256 of a credential: cache keys and stored API keys never hold the secret itself."""
    data = credential.encode("utf-8", "surrogateescape") if isinstance(credential, str) else credential
    return hashlib.sha256(data).digest()


class TtlCache(Generic[V]):
    """A bounded cache whose entries expire at a per-entry absolute time (monotonic clock).

    Oldest entries are evicted first when full. Not thread-safe: use it from the event loop.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_entries
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[float, V]] = OrderedDict()

    def get(self, key: bytes) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._data[key]
            return None
        return entry[1]

    def put(self, key: bytes, value: V, expires_at: float) -> None:
        """Keep ``value`` until ``expires_at``; a time already past removes ``key`` instead."""
        if self._max <= 0 or expires_at <= self._clock():
            self._data.pop(key, None)
            return
        self._data[key] = (expires_at, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


class Forward(BaseModel):
    """Identity attributes to pass on: ``headers`` and dynamic ``metadata``, name -> attribute.

    Attribute paths use dots for nested claims (``realm_access.roles``); lists are joined with
    ``,`` in headers and kept as lists in metadata. Missing attributes are skipped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    headers: dict[HeaderName, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)

    def header_names(self) -> frozenset[str]:
        """The upstream headers this forwards: the identity headers of a step (see
        :class:`extsvc.plugin.protocols.IdentitySource`)."""
        return frozenset(self.headers)

    def apply(self, attributes: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
        headers: dict[str, str] = {}
        for header, path in self.headers.items():
            value = lookup(attributes, path)
            if value is not None:
                headers[header] = _header_text(value)
        metadata: dict[str, Any] = {}
        for key, path in self.metadata.items():
            value = lookup(attributes, path)
            if value is not None:
                metadata[key] = value
        return headers, metadata


def lookup(attributes: Mapping[str, Any], path: str) -> Any:
    """``a.b.c`` in nested mappings; ``None`` if any part is missing."""
    if path in attributes:
        return attributes[path]
    current: Any = attributes
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _header_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    # never let a claim inject a header line or make Envoy reject the mutation (validate_mutations)
    return text.translate(_CONTROL)


#: C0 controls except TAB, and DEL -> space (CR, LF and NUL are what RFC 9110 forbids outright).
_CONTROL = dict.fromkeys((*range(0, 9), *range(10, 32), 127), " ")


class WatchedFile(Generic[V]):
    """A file parsed off the event loop, re-parsed when its modification time or size changes.

    ``value`` is the last good parse; a failed re-parse keeps it and logs. Start the polling with
    :meth:`start` (from a step's ``start()``) and stop it with :meth:`aclose`.
    """

    def __init__(
        self,
        path: Any,
        parse: Callable[[bytes], V],
        interval_s: float,
        logger: Any,
        on_change: Callable[[V], None] | None = None,
    ) -> None:
        self.path = path
        self._parse = parse
        self._interval = interval_s
        self._log = logger
        self._on_change = on_change
        self._stamp: tuple[int, int] | None = None
        self._task: Any = None
        self.value: V = self._load_sync()

    def _load_sync(self) -> V:
        stat = self.path.stat()
        value = self._parse(self.path.read_bytes())
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return value

    async def check(self) -> bool:
        """Re-parse if the file changed; returns whether a new value was taken."""
        try:
            stat = await asyncio.to_thread(self.path.stat)
        except OSError as exc:
            self._log.warning("%s unreadable (%s); keeping the loaded version", self.path, exc)
            return False
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            return False
        try:
            value = await asyncio.to_thread(self._load_sync)
        except Exception as exc:  # noqa: BLE001 (a bad edit must not take down what is serving)
            self._log.error("%s rejected (%s); keeping the loaded version", self.path, exc)
            self._stamp = (stat.st_mtime_ns, stat.st_size)
            return False
        self.value = value
        if self._on_change is not None:
            self._on_change(value)
        self._log.info("%s reloaded", self.path)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    def start(self) -> None:
        if self._task is None and self._interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
