"""ext_proc protobufs <-> the project's value objects. The only ext_proc module importing them.

§ references are to docs/internals/envoy-behaviour.md (§3: ext_proc, §1.2: proto skew,
§1.3: ``raw_value``, §1.4: ``append``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import wrappers_pb2

from extsvc.extproc.events import BodyEvent, Event, HeadersEvent, TrailersEvent
from extsvc.extproc.model import (
    OP_APPEND,
    OP_BODY,
    OP_METADATA,
    OP_REMOVE,
    OP_SET,
    BodyMode,
    HttpMessage,
    ImmediateReply,
    Phase,
)
from extsvc.limits import Overflow, RequestLimits, over_header_caps

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
_Mode = processing_mode_pb2.ProcessingMode

PHASE_OF: dict[str, Phase] = {phase.field: phase for phase in Phase}

BODY_MODES: dict[int, BodyMode] = {
    _Mode.NONE: BodyMode.NONE,
    _Mode.STREAMED: BodyMode.STREAMED,
    _Mode.BUFFERED: BodyMode.BUFFERED,
    _Mode.BUFFERED_PARTIAL: BodyMode.BUFFERED_PARTIAL,
    _Mode.FULL_DUPLEX_STREAMED: BodyMode.FULL_DUPLEX_STREAMED,
}
_BODY_MODE_NUMBERS = {mode: number for number, mode in BODY_MODES.items()}

_RESPONSE_CLASS = {
    Phase.REQUEST_HEADERS: pb.HeadersResponse,
    Phase.RESPONSE_HEADERS: pb.HeadersResponse,
    Phase.REQUEST_BODY: pb.BodyResponse,
    Phase.RESPONSE_BODY: pb.BodyResponse,
    Phase.REQUEST_TRAILERS: pb.TrailersResponse,
    Phase.RESPONSE_TRAILERS: pb.TrailersResponse,
}

#: The unchanged answer to each phase by ``Phase.number``: built once, sent as is (never mutated).
CONTINUE: tuple[Any, ...] = tuple(
    ProcessingResponse(**{phase.field: _RESPONSE_CLASS[phase]()}) for phase in Phase
)

_APPEND_TRUE = wrappers_pb2.BoolValue(value=True)


#: builds an event from its fields in order (``tuple.__new__``): a third of the cost of calling the
#: named tuple's class, which runs a Python ``__new__`` (an event is made per message)
_make = tuple.__new__


def event_of(request: Any, limits: RequestLimits | None = None) -> Event | None:
    """The stream's event for one ``ProcessingRequest``; ``None`` when its ``request`` oneof
    is empty (a protocol error). With ``limits``, header and trailer maps are measured against
    them (:func:`header_overflow`)."""
    which = request.WhichOneof("request")
    phase = PHASE_OF.get(which) if which else None
    if phase is None:
        return None
    inner = getattr(request, which)
    metadata = None
    if request.HasField("metadata_context"):
        metadata = request.metadata_context.filter_metadata
        if not len(metadata):
            metadata = None
    # protocol_config: on a stream's first message only
    modes = body_modes(request) if request.HasField("protocol_config") else None
    observability = request.observability_mode
    if phase.is_body:
        # BodyEvent(phase, body, end_of_stream, observability, metadata, modes, overflow)
        return _make(BodyEvent, (
            phase, inner.body, inner.end_of_stream, observability, metadata, modes, None
        ))
    if phase.is_headers:
        headers = inner.headers
        attributes = request.attributes
        # HeadersEvent(phase, headers, end_of_stream, observability, attributes, metadata,
        # modes, overflow)
        return _make(HeadersEvent, (
            phase,
            headers,
            inner.end_of_stream,
            observability,
            attributes if len(attributes) else None,
            metadata,
            modes,
            None if limits is None else header_overflow(headers, limits, which),
        ))
    trailers = inner.trailers
    # TrailersEvent(phase, trailers, observability, metadata, modes, overflow, end_of_stream)
    return _make(TrailersEvent, (
        phase,
        trailers,
        observability,
        metadata,
        modes,
        None if limits is None else header_overflow(trailers, limits, which),
        True,
    ))


def decode_headers(header_map: Any) -> dict[str, str]:
    """``HeaderMap`` -> ``{lower-case name: value}``; repeated headers are comma-joined.

    Envoy sends ``raw_value`` bytes (docs/internals/envoy-behaviour.md §1.3); ``surrogateescape`` keeps
    non-UTF-8 bytes intact when a processor writes a value back.
    """
    out: dict[str, str] = {}
    # A repeated name's values are collected and joined once: joining as they came copied the
    # whole value for every repeat (quadratic: 400k repeats held the loop for 3.85 s).
    repeated: dict[str, list[str]] | None = None
    for header in header_map.headers:
        raw = header.raw_value
        value = raw.decode("utf-8", "surrogateescape") if raw else header.value
        key = header.key
        if key in out:
            if repeated is None:
                repeated = {}
            values = repeated.get(key)
            if values is None:
                repeated[key] = [out[key], value]
            else:
                values.append(value)
        else:
            out[key] = value
    if repeated is not None:
        for key, values in repeated.items():
            out[key] = ",".join(values)
    return out


def header_overflow(header_map: Any, limits: RequestLimits, what: str) -> Overflow | None:
    """The cap of ``limits`` a ``HeaderMap`` (headers or trailers) is over, if any.

    One ``ByteSize()`` clears the common message; above ``limits.quick_bytes`` the count, then
    (when the message could be over it) the bytes of names and values, which the count bounds.
    """
    size = header_map.ByteSize()
    if size <= limits.quick_bytes:
        return None
    headers = header_map.headers
    count = len(headers)
    header_bytes = -1
    if count <= limits.max_headers and size > limits.max_header_bytes:
        header_bytes = sum(
            len(header.key) + (len(header.raw_value) or len(header.value.encode()))
            for header in headers
        )
    return over_header_caps(count, header_bytes, limits, what)


def decode_struct_map(raw: Any) -> dict[str, Any]:
    """``map<string, Struct>`` (``attributes``, ``filter_metadata``) -> plain Python."""
    return {key: _struct(value) for key, value in raw.items()}


def _struct(struct: Any) -> dict[str, Any]:
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    if kind == "null_value" or kind is None:
        return None
    return getattr(value, kind)


def body_modes(request: Any) -> tuple[BodyMode, BodyMode, bool] | None:
    """``protocol_config`` of the first message: (request mode, response mode, no-wait flag)."""
    if not request.HasField("protocol_config"):
        return None
    config = request.protocol_config
    return (
        BODY_MODES.get(config.request_body_mode, BodyMode.NONE),
        BODY_MODES.get(config.response_body_mode, BodyMode.NONE),
        bool(config.send_body_without_waiting_for_header_response),
    )


def _encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def header_mutation(ops: Iterable[tuple[Any, ...]], target: Any) -> bool:
    """Fold a message's header operations into ``target`` (a HeaderMutation); any written?

    Per header name only the net effect is sent: a ``set`` after ``append``s overwrites them,
    a ``remove`` cancels earlier sets. Envoy applies ``remove_headers`` before ``set_headers``.
    Values go in ``raw_value`` only (docs/internals/envoy-behaviour.md §1.3), ``append`` as the BoolValue
    (docs/internals/envoy-behaviour.md §1.4).
    """
    sets: dict[str, list[tuple[str, bool]]] = {}
    removes: dict[str, None] = {}
    for op in ops:
        code = op[0]
        if code == OP_SET:
            sets[op[1]] = [(op[2], False)]
            removes.pop(op[1], None)
        elif code == OP_APPEND:
            sets.setdefault(op[1], []).append((op[2], True))
        elif code == OP_REMOVE:
            sets.pop(op[1], None)
            removes[op[1]] = None
    if not sets and not removes:
        return False
    for name, values in sets.items():
        for value, append in values:
            option = target.set_headers.add()
            option.header.key = name
            option.header.raw_value = _encode(value)
            if append:
                option.append.CopyFrom(_APPEND_TRUE)
    target.remove_headers.extend(removes)
    return True


def _set_content_length(target: Any, length: int) -> None:
    # Replace any content-length a processor set: the real length is the only right value.
    for option in list(target.set_headers):
        if option.header.key == "content-length":
            target.set_headers.remove(option)
    option = target.set_headers.add()
    option.header.key = "content-length"
    option.header.raw_value = str(length).encode()


def answer(
    message: HttpMessage,
    *,
    content_length: bool = False,
    streamed: bool = False,
) -> Any:
    """The ``ProcessingResponse`` carrying a message's changes (its reply when it has one).

    :param content_length: set ``content-length`` to the new body length when the body changed
        (BUFFERED with headers sent: docs/internals/envoy-behaviour.md §3.3).
    :param streamed: FULL_DUPLEX_STREAMED: the chunk always goes back as ``streamed_response``.
    """
    if message.reply is not None:
        return immediate(message.reply)
    phase = message.phase
    ops = message.ops
    if not ops and not streamed and not message.replace_requested and not (
        message.clear_route_cache_requested
    ):
        return CONTINUE[phase.number]
    response = ProcessingResponse()
    inner = getattr(response, phase.field)
    if phase.is_trailers:
        header_mutation(ops, inner.header_mutation)
    else:
        common = inner.response
        if message.replace_requested:
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
        header_mutation(ops, common.header_mutation)
        if streamed:
            chunk = common.body_mutation.streamed_response
            chunk.body = message.body
            chunk.end_of_stream = message.end_of_stream
        else:
            body_op = None
            for op in ops:
                if op[0] == OP_BODY:
                    body_op = op
            if body_op is not None:
                if body_op[1] is None:
                    common.body_mutation.clear_body = True
                else:
                    common.body_mutation.body = body_op[1]
                if content_length and len(message.body) != len(message.original_body):
                    _set_content_length(common.header_mutation, len(message.body))
        if message.clear_route_cache_requested:
            common.clear_route_cache = True
    metadata = [op for op in ops if op[0] == OP_METADATA]
    if metadata:
        namespaces: dict[str, dict[str, Any]] = {}
        for _, namespace, key, value in metadata:
            namespaces.setdefault(namespace, {})[key] = value
        response.dynamic_metadata.update(namespaces)
    if not response.WhichOneof("response"):
        getattr(response, phase.value).SetInParent()
    return response


def echo_chunk(phase: Phase, body: bytes, end_of_stream: bool) -> Any:
    """FULL_DUPLEX_STREAMED: pass a chunk on unchanged as a ``streamed_response``.

    See docs/internals/envoy-behaviour.md §3.3.
    """
    response = ProcessingResponse()
    chunk = getattr(response, phase.value).response.body_mutation.streamed_response
    chunk.body = body
    chunk.end_of_stream = end_of_stream
    if not body and not end_of_stream:
        getattr(response, phase.value).response.body_mutation.streamed_response.SetInParent()
    return response


def immediate(reply: ImmediateReply) -> Any:
    """An ``immediate_response``, its status always set: a missing one becomes 200.

    See docs/internals/envoy-behaviour.md §3.7.
    """
    response = ProcessingResponse()
    out = response.immediate_response
    out.status.code = reply.status  # an open enum: any 200..599 number goes through as is
    if reply.body:
        out.body = reply.body
    if reply.details:
        out.details = reply.details
    if reply.grpc_status is not None:
        out.grpc_status.status = reply.grpc_status
    for name, value in reply.headers.items():
        option = out.headers.set_headers.add()
        option.header.key = name.lower()
        option.header.raw_value = _encode(value)
    return response


def with_mode_override(
    response: Any,
    *,
    request_body: BodyMode,
    response_body: BodyMode,
    skip_response_headers: bool,
    request_trailers: bool = False,
    response_trailers: bool = False,
) -> Any:
    """A copy of a headers answer carrying ``mode_override`` (docs/internals/envoy-behaviour.md §3.4).

    Both body modes are always spelled out (an omitted one means NONE); header modes stay
    DEFAULT (= keep Envoy's) except ``response_header_mode`` SKIP when asked. Trailer modes are
    SEND for the trailers the policy needs: Envoy 1.40 stops sending trailers after an override
    whose trailer mode is DEFAULT (observed through a real Envoy: tests/e2e/test_extproc.py).
    """
    out = ProcessingResponse()
    out.CopyFrom(response)
    mode = out.mode_override
    mode.request_body_mode = _BODY_MODE_NUMBERS[request_body]
    mode.response_body_mode = _BODY_MODE_NUMBERS[response_body]
    if skip_response_headers:
        mode.response_header_mode = _Mode.SKIP
    if request_trailers:
        mode.request_trailer_mode = _Mode.SEND
    if response_trailers:
        mode.response_trailer_mode = _Mode.SEND
    return out
