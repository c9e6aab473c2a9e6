"""The ext_authz value objects plugins see: :class:`CheckContext` in, :class:`Decision` out.

They are small frozen dataclasses built once per request by :mod:`extsvc.authz.convert`; no
protobuf type leaks past that module. They live with the plugin API (not in :mod:`extsvc.authz`)
because the :class:`~extsvc.plugin.protocols.Authorizer` protocol speaks them, and the plugin API
sits below the three protocol packages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of the downstream connection, as Envoy saw it.

    ``principal`` and ``certificate`` are only filled on TLS listeners: the URI SAN (else DNS SAN,
    else subject) and the URL-encoded PEM of the peer certificate
    (docs/internals/envoy-behaviour.md §2.1).
    """

    address: str = ""
    port: int = 0
    principal: str = ""
    certificate: str = ""
    service: str = ""
    labels: Mapping[str, str] = field(default_factory=_empty)


_FIELDS = (
    "method", "path", "query", "host", "scheme", "protocol", "headers", "body", "body_truncated",
    "source", "destination", "tls_sni", "request_id", "stream_id", "context_extensions",
    "metadata", "route_metadata", "policy",
)


class CheckContext:
    """What a policy knows about the HTTP request Envoy asks about (read-only).

    ``headers`` has lower-case names; repeated headers are comma-joined, as Envoy sends them, and
    pseudo-headers (``:path``, ``:authority``...) are included. ``path`` is without the query,
    ``query`` the raw query string after ``?``. ``body`` is ``None`` when Envoy sent no body
    (``with_request_body`` off, a GET, or a route that disables buffering); ``body_truncated`` is
    true when Envoy cut it at ``max_request_bytes``. ``request_id`` is the ``x-request-id`` header
    (``stream_id`` is Envoy's internal stream id, not a correlation id). ``policy`` is the name of
    the policy being evaluated.

    The server builds a lazy variant that reads each field from Envoy's message on first access,
    so a step pays only for what it looks at; tests and plugins build one with keywords.
    """

    __slots__ = tuple(f"_{name}" for name in _FIELDS)

    def __init__(
        self,
        *,
        method: str = "GET",
        path: str = "/",
        query: str = "",
        host: str = "",
        scheme: str = "",
        protocol: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        body_truncated: bool = False,
        source: Peer | None = None,
        destination: Peer | None = None,
        tls_sni: str = "",
        request_id: str = "",
        stream_id: str = "",
        context_extensions: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        route_metadata: Mapping[str, Any] | None = None,
        policy: str = "",
    ) -> None:
        self._method = method
        self._path = path
        self._query = query
        self._host = host
        self._scheme = scheme
        self._protocol = protocol
        self._headers = MappingProxyType(dict(headers)) if headers else _EMPTY
        self._body = body
        self._body_truncated = body_truncated
        self._source = source or Peer()
        self._destination = destination or Peer()
        self._tls_sni = tls_sni
        self._request_id = request_id
        self._stream_id = stream_id
        self._context_extensions = (
            MappingProxyType(dict(context_extensions)) if context_extensions else _EMPTY
        )
        self._metadata = MappingProxyType(dict(metadata)) if metadata else _EMPTY
        self._route_metadata = MappingProxyType(dict(route_metadata)) if route_metadata else _EMPTY
        self._policy = policy

    @property
    def method(self) -> str:
        return self._method

    @property
    def path(self) -> str:
        return self._path

    @property
    def query(self) -> str:
        return self._query

    @property
    def host(self) -> str:
        return self._host

    @property
    def scheme(self) -> str:
        return self._scheme

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def body(self) -> bytes | None:
        return self._body

    @property
    def body_truncated(self) -> bool:
        return self._body_truncated

    @property
    def source(self) -> Peer:
        return self._source

    @property
    def destination(self) -> Peer:
        return self._destination

    @property
    def tls_sni(self) -> str:
        return self._tls_sni

    @property
    def request_id(self) -> str:
        return self._request_id

    @property
    def stream_id(self) -> str:
        return self._stream_id

    @property
    def context_extensions(self) -> Mapping[str, str]:
        return self._context_extensions

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._metadata

    @property
    def route_metadata(self) -> Mapping[str, Any]:
        return self._route_metadata

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def query_params(self) -> dict[str, list[str]]:
        """The query string parsed into ``name -> [values]`` (percent-decoded)."""
        parsed: dict[str, list[str]] = {}
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            parsed.setdefault(key, []).append(value)
        return parsed

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckContext):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CheckContext({self.method} {self.path}, policy={self.policy!r})"


class ResponseHeaderAction(StrEnum):
    """How a header is added to the upstream's response (Envoy honours these).

    See docs/internals/envoy-behaviour.md §1.4.
    """

    APPEND = "append"  # add another header line (Envoy's default)
    ADD_IF_ABSENT = "add-if-absent"
    OVERWRITE_IF_EXISTS = "overwrite-if-exists"
    OVERWRITE = "overwrite"  # overwrite if present, else add


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    name: str
    value: str
    action: ResponseHeaderAction = ResponseHeaderAction.APPEND


Pairs = tuple[tuple[str, str], ...]


def _pairs(items: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Pairs:
    if items is None:
        return ()
    if isinstance(items, Mapping):
        return tuple((str(k).lower(), str(v)) for k, v in items.items())
    return tuple((str(k).lower(), str(v)) for k, v in items)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of a step (or of a whole policy).

    Build one with :meth:`allow` or :meth:`deny`. On allow, ``upstream_set`` overwrites or adds
    request headers, ``upstream_append`` comma-appends to a header *that exists* (Envoy 1.40 adds
    nothing if it is absent), ``upstream_remove`` strips headers (not ``:``-headers or ``host``),
    ``response_headers`` go on the upstream's response, ``query_set``/``query_remove`` edit the
    query string and ``metadata`` becomes dynamic metadata under ``envoy.filters.http.ext_authz``.
    On deny, ``status``/``body``/``headers`` form the local reply and ``grpc_code`` is the
    non-zero code put in ``CheckResponse.status`` (Envoy only checks that it is not 0).
    ``reason`` is for the log, never sent to the client.
    """

    allowed: bool
    status: int = 403
    body: str = ""
    headers: Pairs = ()
    grpc_code: int = 7
    upstream_set: Pairs = ()
    upstream_append: Pairs = ()
    upstream_remove: tuple[str, ...] = ()
    response_headers: tuple[ResponseHeader, ...] = ()
    query_set: Pairs = ()
    query_remove: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=_empty)
    reason: str = ""

    @classmethod
    def allow(
        cls,
        *,
        upstream_set: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        upstream_append: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        upstream_remove: Iterable[str] = (),
        response_headers: Iterable[ResponseHeader] = (),
        query_set: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        query_remove: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
        reason: str = "",
    ) -> Decision:
        """Let the request through, optionally changing it on the way."""
        return cls(
            allowed=True,
            status=200,
            grpc_code=0,
            upstream_set=_pairs(upstream_set),
            upstream_append=_pairs(upstream_append),
            upstream_remove=tuple(h.lower() for h in upstream_remove),
            response_headers=tuple(response_headers),
            query_set=tuple((str(k), str(v)) for k, v in _items(query_set)),
            query_remove=tuple(query_remove),
            metadata=MappingProxyType(dict(metadata)) if metadata else _EMPTY,
            reason=reason,
        )

    @classmethod
    def deny(
        cls,
        status: int = 403,
        body: str = "",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        *,
        reason: str = "",
        grpc_code: int | None = None,
    ) -> Decision:
        """Answer the client with a local reply; the request never reaches the upstream."""
        if not 200 <= status <= 599:
            raise ValueError(f"deny status must be an HTTP status (200-599), got {status}")
        code = grpc_code if grpc_code is not None else (16 if status == 401 else 7)
        if code == 0:
            raise ValueError("a denial needs a non-zero gRPC code; 0 would allow the request")
        return cls(
            allowed=False,
            status=status,
            body=body,
            headers=_pairs(headers),
            grpc_code=code,
            reason=reason,
        )

    def with_reason(self, reason: str) -> Decision:
        return replace(self, reason=reason)

    def merge(self, later: Decision) -> Decision:
        """Combine two allows: ``later``'s mutations apply after (and win over) this one's."""
        if not (self.allowed and later.allowed):
            raise ValueError("only two allow decisions can be merged")
        metadata = {**self.metadata, **later.metadata}
        return Decision(
            allowed=True,
            status=200,
            grpc_code=0,
            upstream_set=self.upstream_set + later.upstream_set,
            upstream_append=self.upstream_append + later.upstream_append,
            upstream_remove=self.upstream_remove + later.upstream_remove,
            response_headers=self.response_headers + later.response_headers,
            query_set=self.query_set + later.query_set,
            query_remove=self.query_remove + later.query_remove,
            metadata=MappingProxyType(metadata) if metadata else _EMPTY,
            reason="; ".join(r for r in (self.reason, later.reason) if r),
        )


def _items(
    items: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> Iterable[tuple[str, str]]:
    if items is None:
        return ()
    if isinstance(items, Mapping):
        return items.items()
    return items
