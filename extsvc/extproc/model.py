"""What an ext_proc processor sees and changes: the plugin-facing half of the ext_proc service.

A policy's processors run in order for each message Envoy sends. Each gets the same
:class:`HttpMessage`; what an earlier processor changed (headers, body) is what a later one reads,
and all the changes become one answer to Envoy. No protobuf here: :mod:`extsvc.extproc.convert`
turns a message's recorded changes into the ``ProcessingResponse``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """The six messages Envoy may send on an ext_proc stream (docs/internals/envoy-behaviour.md §3.2).

    Each member also has the plain attributes ``field`` (the protobuf oneof name), ``number``
    (0..5), ``is_request``, ``is_headers``, ``is_body``, ``is_trailers`` and ``body_phase``
    (the body phase of the same direction): they are read for every message, and plain
    attributes cost a fraction of Enum properties.
    """

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"

    field: str
    number: int
    is_request: bool
    is_headers: bool
    is_body: bool
    is_trailers: bool
    body_phase: Phase


for _index, _phase in enumerate(Phase):
    _phase.field = _phase.value
    _phase.number = _index
    _phase.is_request = _phase.value.startswith("request")
    _phase.is_headers = _phase.value.endswith("headers")
    _phase.is_body = _phase.value.endswith("body")
    _phase.is_trailers = _phase.value.endswith("trailers")
for _phase in Phase:
    _phase.body_phase = Phase.REQUEST_BODY if _phase.is_request else Phase.RESPONSE_BODY


class BodyMode(StrEnum):
    """How Envoy sends a body (``ProcessingMode.BodySendMode``, docs/internals/envoy-behaviour.md §3.3)."""

    NONE = "none"
    STREAMED = "streamed"
    BUFFERED = "buffered"
    BUFFERED_PARTIAL = "buffered_partial"
    FULL_DUPLEX_STREAMED = "full_duplex_streamed"


class Exchange:
    """One HTTP request/response as a stream of messages; shared by every message of the stream.

    :ivar policy: the policy serving the stream.
    :ivar state: per-stream scratch space for processors (processor objects are shared by all
        streams; key your entries by ``self``).
    :ivar started: clock reading when the stream opened.
    :ivar request_done: clock reading when extsvc answered the last request-direction message
        (``None`` before) -- the request left for the upstream then.
    :ivar request_body_mode: / :ivar response_body_mode: what Envoy said it would send.
    """

    # Class-level defaults: a stream's Exchange is made per HTTP request, and most of these
    # are never set (an instance stores only what differs; measured: half the construction).
    policy = ""
    request_done: float | None = None
    request_body_mode = BodyMode.NONE
    response_body_mode = BodyMode.NONE
    _raw_request_headers: Any = None
    _raw_response_headers: Any = None
    _request_headers: dict[str, str] | None = None
    _response_headers: dict[str, str] | None = None
    _attributes_raw: Any = None
    _attributes: dict[str, Any] | None = None
    _metadata_raw: Any = None
    _metadata: dict[str, Any] | None = None
    _decode: Callable[[Any], dict[str, str]] = staticmethod(lambda raw: dict(raw))
    _decode_struct: Callable[[Any], dict[str, Any]] = staticmethod(lambda raw: dict(raw))

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        decode: Callable[[Any], dict[str, str]] | None = None,
        decode_struct: Callable[[Any], dict[str, Any]] | None = None,
        policy: str = "",
    ) -> None:
        self.clock = clock
        self.state: dict[object, Any] = {}
        self.started = clock()
        if policy:
            self.policy = policy
        if decode is not None:
            self._decode = decode
        if decode_struct is not None:
            self._decode_struct = decode_struct
        # Header changes made so far, per direction: the header dicts are decoded only when a
        # processor reads them (most only write), then these are replayed onto them.
        self._request_ops: list[tuple[Any, ...]] = []
        self._response_ops: list[tuple[Any, ...]] = []

    @property
    def request_headers(self) -> dict[str, str]:
        """The request headers as they are now (earlier processors' changes applied).

        Lower-case names, pseudo-headers included, repeated headers comma-joined; empty if Envoy
        did not send the request headers. Change them through :class:`HttpMessage` methods only.
        """
        if self._request_headers is None:
            headers = {} if self._raw_request_headers is None else self._decode(self._raw_request_headers)
            _replay(headers, self._request_ops)
            self._request_headers = headers
        return self._request_headers

    @property
    def response_headers(self) -> dict[str, str]:
        """The response headers as they are now (``:status`` included); empty before them."""
        if self._response_headers is None:
            headers = (
                {} if self._raw_response_headers is None else self._decode(self._raw_response_headers)
            )
            _replay(headers, self._response_ops)
            self._response_headers = headers
        return self._response_headers

    @property
    def has_request_headers(self) -> bool:
        """Whether Envoy sent the request headers (read without decoding them)."""
        return self._raw_request_headers is not None

    # -- fed by the stream (what Envoy sent), never by processors ----------------------------

    def take_headers(self, request: bool, raw: Any) -> None:
        """A direction's headers as Envoy sent them (decoded, with the changes, on first read)."""
        if request:
            self._raw_request_headers = raw
            self._request_headers = None
        else:
            self._raw_response_headers = raw
            self._response_headers = None

    def take_metadata(self, raw: Any) -> None:
        """The latest message's forwarded ``metadata_context`` (decoded on first read)."""
        self._metadata_raw = raw
        self._metadata = None

    def record_changes(self, request: bool, ops: Iterable[tuple[Any, ...]]) -> None:
        """Header changes made without an :class:`HttpMessage` (a policy's fixed answer)."""
        if request:
            self._request_ops.extend(ops)
        else:
            self._response_ops.extend(ops)

    def forget_headers(self, request: bool) -> None:
        """Drop a direction's decoded headers: decoded again, changes replayed, when read."""
        if request:
            self._request_headers = None
        else:
            self._response_headers = None

    @property
    def attributes(self) -> Mapping[str, Any]:
        """Envoy's ``request_attributes`` / ``response_attributes`` (``request.path``, ...).

        Request attributes arrive with the request headers, response ones with the response
        headers; both are merged here.
        """
        if self._attributes is None:
            merged: dict[str, Any] = {}
            for raw in self._attributes_raw or ():
                for fields in self._decode_struct(raw).values():  # key envoy.filters.http.ext_proc
                    if isinstance(fields, Mapping):
                        merged.update(fields)
            self._attributes = merged
        return self._attributes

    def add_attributes(self, raw: Any) -> None:
        """Keep one more message's raw ``attributes`` map (decoded on first read)."""
        self._attributes_raw = [*(self._attributes_raw or ()), raw]
        self._attributes = None

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The forwarded ``metadata_context`` (namespace -> fields), latest message's."""
        if self._metadata is None:
            self._metadata = (
                {} if self._metadata_raw is None else self._decode_struct(self._metadata_raw)
            )
        return self._metadata

    @property
    def request_id(self) -> str:
        return self.request_headers.get("x-request-id", "")


class ImmediateReply:
    """A local reply Envoy sends instead of continuing (``ImmediateResponse``)."""

    __slots__ = ("body", "details", "grpc_status", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        details: str,
        grpc_status: int | None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers)
        self.details = details
        self.grpc_status = grpc_status


# Operation codes of HttpMessage's change log (compact tuples; replayed on rollback).
OP_SET = 0
OP_APPEND = 1
OP_REMOVE = 2
OP_BODY = 3
OP_METADATA = 4


class HttpMessage:
    """One message of the stream as processors see it, and the changes they make to it.

    For ``*_headers`` phases :attr:`headers` are that direction's headers; for ``*_trailers``
    phases the trailers; for ``*_body`` phases the direction's headers (read them; changing them
    only takes effect in BUFFERED mode, docs/internals/envoy-behaviour.md §3.3). :attr:`body` is the body (or
    this chunk in STREAMED / FULL_DUPLEX_STREAMED modes) as earlier processors left it.
    """

    __slots__ = (
        "_base",
        "_body",
        "_header_ops",
        "_original",
        "_raw",
        "_trailers",
        "clear_route_cache_requested",
        "end_of_stream",
        "exchange",
        "ops",
        "phase",
        "replace_requested",
        "reply",
    )

    def __init__(
        self,
        phase: Phase,
        exchange: Exchange,
        *,
        body: bytes = b"",
        end_of_stream: bool = False,
        raw_trailers: Any = None,
    ) -> None:
        self.phase = phase
        self.exchange = exchange
        self.end_of_stream = end_of_stream
        self.ops: list[tuple[Any, ...]] = []
        self.reply: ImmediateReply | None = None
        self.replace_requested = False
        self.clear_route_cache_requested = False
        self._body = body
        self._original = body
        self._raw = raw_trailers
        self._trailers: dict[str, str] | None = None
        # the direction's list of header changes (trailers: this message's own list)
        if phase.is_trailers:
            self._header_ops: list[tuple[Any, ...]] = []
        else:
            self._header_ops = exchange._request_ops if phase.is_request else exchange._response_ops
        self._base = len(self._header_ops)

    # -- reading ------------------------------------------------------------------------------

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers (or trailers) of this message's direction, as they are now."""
        phase = self.phase
        if phase.is_trailers:
            if self._trailers is None:
                trailers = {} if self._raw is None else self.exchange._decode(self._raw)
                _replay(trailers, self._header_ops)
                self._trailers = trailers
            return self._trailers
        return self.exchange.request_headers if phase.is_request else self.exchange.response_headers

    def _decoded(self) -> dict[str, str] | None:
        """The headers dict if something already decoded it, else ``None`` (changes wait)."""
        phase = self.phase
        if phase.is_trailers:
            return self._trailers
        exchange = self.exchange
        return exchange._request_headers if phase.is_request else exchange._response_headers

    @property
    def body(self) -> bytes:
        """The body (BUFFERED) or this chunk (STREAMED), after earlier processors' changes."""
        return self._body

    @property
    def original_body(self) -> bytes:
        """The body (or chunk) as Envoy sent it."""
        return self._original

    @property
    def body_mode(self) -> BodyMode:
        return (
            self.exchange.request_body_mode if self.phase.is_request
            else self.exchange.response_body_mode
        )

    @property
    def body_changed(self) -> bool:
        return any(op[0] == OP_BODY for op in self.ops)

    # -- changing -----------------------------------------------------------------------------

    def set_header(self, name: str, value: str) -> None:
        """Overwrite (or add) a header. Sent to Envoy as ``raw_value`` with ``append`` unset."""
        self._header_op((OP_SET, name.lower(), value))

    def append_header(self, name: str, value: str) -> None:
        """Add another line of a header (``append: true``), or the header if it is missing."""
        self._header_op((OP_APPEND, name.lower(), value))

    def remove_header(self, name: str) -> None:
        """Remove a header (Envoy ignores removing pseudo-headers and ``host``)."""
        self._header_op((OP_REMOVE, name.lower()))

    def _header_op(self, op: tuple[Any, ...]) -> None:
        self.ops.append(op)
        self._header_ops.append(op)
        headers = self._decoded()
        if headers is not None:
            _replay(headers, (op,))

    def set_body(self, body: bytes) -> None:
        """Replace the body (or this chunk). In BUFFERED mode extsvc fixes ``content-length``.

        On a trailers message in FULL_DUPLEX_STREAMED mode: a last body chunk, sent on before
        the trailers (how a processor that collected the body's chunks sends them on when the
        body ends with trailers). In other modes a trailers message cannot carry a body.
        """
        self._body = bytes(body)
        self.ops.append((OP_BODY, self._body))

    def clear_body(self) -> None:
        """Remove the body (``clear_body``)."""
        self._body = b""
        self.ops.append((OP_BODY, None))

    def set_metadata(self, namespace: str, key: str, value: Any) -> None:
        """Dynamic metadata for later filters; Envoy keeps only ``receiving_namespaces``."""
        self.ops.append((OP_METADATA, namespace, key, value))

    def clear_route_cache(self) -> None:
        """Ask Envoy to recompute the route (request path, with a header change)."""
        self.clear_route_cache_requested = True

    def continue_and_replace(self) -> None:
        """``CONTINUE_AND_REPLACE``: apply the changes and send nothing more for this direction."""
        self.replace_requested = True

    def respond(
        self,
        status: int,
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
        *,
        details: str = "",
        grpc_status: int | None = None,
    ) -> None:
        """Answer the client now with a local reply; later processors do not run.

        :param status: HTTP status, 200..599 (Envoy turns a missing one into 200,
            docs/internals/envoy-behaviour.md §3.7).
        :param details: goes to Envoy's ``%RESPONSE_CODE_DETAILS%``.
        :param grpc_status: for gRPC clients: sent as ``grpc-status`` (HTTP status 200).
        """
        if not 200 <= status <= 599:
            raise ValueError(f"immediate response status must be 200..599, got {status}")
        data = body.encode() if isinstance(body, str) else bytes(body)
        self.reply = ImmediateReply(status, data, headers or {}, details, grpc_status)

    # -- used by the pipeline -----------------------------------------------------------------

    def rollback(self, mark: int) -> None:
        """Undo every change after ``len(ops) == mark`` (a processor failed half-way)."""
        kept = self.ops[:mark]
        self.ops = []
        self.reply = None
        self.replace_requested = False
        self.clear_route_cache_requested = False
        del self._header_ops[self._base:]
        # forget the decoded headers: they are decoded again, with the kept changes, when read
        if self.phase.is_trailers:
            self._trailers = None
        else:
            self.exchange.forget_headers(self.phase.is_request)
        self._body = self._original
        for op in kept:
            code = op[0]
            if code in (OP_SET, OP_APPEND, OP_REMOVE):
                self._header_op(op)
            elif code == OP_BODY:
                self._body = b"" if op[1] is None else op[1]
                self.ops.append(op)
            else:
                self.ops.append(op)


def _replay(headers: dict[str, str], ops: Iterable[tuple[Any, ...]]) -> None:
    """Apply header operations to a decoded headers dict."""
    for op in ops:
        code = op[0]
        if code == OP_SET:
            headers[op[1]] = op[2]
        elif code == OP_APPEND:
            old = headers.get(op[1])
            headers[op[1]] = op[2] if old is None else f"{old},{op[2]}"
        elif code == OP_REMOVE:
            headers.pop(op[1], None)


class HeaderChanges:
    """Header changes a processor makes in a phase whatever the message (see
    :meth:`Processor.fixed_headers`). Applied in the order ``remove``, ``set``, ``add``.

    :param set: headers to overwrite (or add).
    :param add: headers to add another line of (``append: true``).
    :param remove: headers to remove.
    """

    __slots__ = ("add", "remove", "set")

    def __init__(
        self,
        *,
        set: Mapping[str, str] | None = None,
        add: Mapping[str, str] | None = None,
        remove: Iterable[str] = (),
    ) -> None:
        self.set = {name.lower(): str(value) for name, value in (set or {}).items()}
        self.add = {name.lower(): str(value) for name, value in (add or {}).items()}
        self.remove = tuple(name.lower() for name in remove)

    def ops(self) -> tuple[tuple[Any, ...], ...]:
        """The changes as :class:`HttpMessage` records them."""
        return (
            *((OP_REMOVE, name) for name in self.remove),
            *((OP_SET, name, value) for name, value in self.set.items()),
            *((OP_APPEND, name, value) for name, value in self.add.items()),
        )

    def __repr__(self) -> str:
        return f"HeaderChanges(set={self.set!r}, add={self.add!r}, remove={list(self.remove)!r})"


class Processor:
    """Base class of ext_proc processors: override the hooks you need.

    Each hook gets the :class:`HttpMessage` and changes it in place; it returns nothing. Hooks
    are ``async`` and run under the policy's ``timeout_ms``; one that raises or overruns is
    answered per the policy's ``on_error``, with the processor named in the log and counted.

    ``phases`` declares which messages the processor needs. Leave it ``None`` and it is worked
    out from the hooks the subclass overrides; set it (on the class or in ``__init__``) when it
    depends on the config. extsvc asks Envoy (``mode_override``) not to send the messages that
    no processor of the policy needs.

    ``reads`` declares the messages the processor reads from a later hook without a hook of its
    own for them -- a body processor that looks at the direction's ``content-type`` reads that
    direction's headers. Envoy is then never told to skip them, but no hook is called for them.

    ``whole_bodies`` declares the body phases the processor must see whole: the first answer's
    ``mode_override`` then asks Envoy to buffer them (``BUFFERED`` in place of ``STREAMED`` or
    ``BUFFERED_PARTIAL``), so Envoy forwards nothing of such a body before extsvc answered it
    and refuses one over its buffer limit (413). Envoy ignores the override with
    ``FULL_DUPLEX_STREAMED``, with ``send_body_without_waiting_for_header_response``, without
    ``allow_mode_override`` or when ``allowed_override_modes`` leaves it out: check
    :attr:`HttpMessage.body_mode` in the hook.
    """

    phases: frozenset[Phase] | None = None
    reads: frozenset[Phase] = frozenset()
    whole_bodies: frozenset[Phase] = frozenset()

    def fixed_headers(self, phase: Phase, /) -> HeaderChanges | None:
        """The header changes this processor makes in ``phase`` when they never depend on the
        message, else ``None`` (the default: the hook runs for every message).

        Asked once per phase when the config is compiled, for the request and response headers
        phases. When every processor of a policy answers for a phase, extsvc builds that
        phase's answer once and sends it without calling the hooks (and without timing them:
        they do not run). Return ``None`` when the changes depend on anything in the message.
        """
        return None

    async def on_request_headers(self, message: HttpMessage, /) -> None:
        """The request headers (``message.headers``); ``message.end_of_stream`` = no body."""

    async def on_request_body(self, message: HttpMessage, /) -> None:
        """The request body (BUFFERED) or one chunk of it (STREAMED)."""

    async def on_request_trailers(self, message: HttpMessage, /) -> None:
        """The request trailers (only with trailer mode SEND and when the client sent some)."""

    async def on_response_headers(self, message: HttpMessage, /) -> None:
        """The response headers (``:status`` included)."""

    async def on_response_body(self, message: HttpMessage, /) -> None:
        """The response body (BUFFERED) or one chunk of it (STREAMED)."""

    async def on_response_trailers(self, message: HttpMessage, /) -> None:
        """The response trailers."""


_HOOK_NAMES: dict[Phase, str] = {phase: f"on_{phase.field}" for phase in Phase}


def hook_name(phase: Phase) -> str:
    return _HOOK_NAMES[phase]


def declared_phases(processor: object) -> frozenset[Phase]:
    """The phases ``processor`` needs: its ``phases``, or the hooks it overrides."""
    declared = getattr(processor, "phases", None)
    if declared is not None:
        return frozenset(Phase(p) for p in declared)
    found = set()
    for phase, name in _HOOK_NAMES.items():
        method = getattr(type(processor), name, None)
        if method is not None and method is not getattr(Processor, name):
            found.add(phase)
    return frozenset(found)
