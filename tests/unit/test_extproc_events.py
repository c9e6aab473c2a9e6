"""convert.event_of: one small event per ProcessingRequest, what the stream state machine reads."""

from __future__ import annotations

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extsvc.extproc.convert import event_of
from extsvc.extproc.events import BodyEvent, HeadersEvent, TrailersEvent
from extsvc.extproc.model import BodyMode, Phase
from extsvc.extproc.stream import ExtprocStream, ProtocolError
from extsvc.limits import RequestLimits
from extsvc.testing.extproc import body_message, headers_message, stream_for, trailers_message


def test_headers_event_has_its_fields_in_place() -> None:
    request = headers_message(
        {":path": "/"}, end_of_stream=True, modes=("buffered", "streamed"),
        attributes={"request.path": "/"}, metadata={"ns": {"k": "v"}},
    )
    event = event_of(request)
    assert isinstance(event, HeadersEvent)
    assert event == HeadersEvent(
        phase=Phase.REQUEST_HEADERS,
        headers=request.request_headers.headers,
        end_of_stream=True,
        observability=False,
        attributes=request.attributes,
        metadata=request.metadata_context.filter_metadata,
        modes=(BodyMode.BUFFERED, BodyMode.STREAMED, False),
        overflow=None,
    )


def test_headers_event_without_attributes_metadata_or_modes() -> None:
    event = event_of(headers_message(response=True, observability=True))
    assert isinstance(event, HeadersEvent)
    assert (event.phase, event.attributes, event.metadata, event.modes, event.observability) == (
        Phase.RESPONSE_HEADERS, None, None, None, True
    )


def test_body_event_has_its_fields_in_place() -> None:
    event = event_of(body_message(b"abc", response=True, end_of_stream=False))
    assert event == BodyEvent(
        phase=Phase.RESPONSE_BODY, body=b"abc", end_of_stream=False, observability=False,
        metadata=None, modes=None, overflow=None,
    )


def test_trailers_event_has_its_fields_in_place_and_ends_its_direction() -> None:
    request = trailers_message({"x-t": "1"})
    event = event_of(request)
    assert event == TrailersEvent(
        phase=Phase.REQUEST_TRAILERS, trailers=request.request_trailers.trailers,
        observability=False, metadata=None, modes=None, overflow=None, end_of_stream=True,
    )


def test_header_maps_are_measured_only_against_given_limits() -> None:
    request = headers_message([(":path", "/")] + [("x-h", "v")] * 20)
    assert event_of(request).overflow is None  # type: ignore[union-attr]
    limits = RequestLimits(max_headers=10)
    overflow = event_of(request, limits).overflow  # type: ignore[union-attr]
    assert overflow is not None and overflow.reason == "header-count"


def test_an_empty_message_has_no_event_and_is_a_protocol_error() -> None:
    assert event_of(pb.ProcessingRequest()) is None
    with pytest.raises(ProtocolError) as raised:
        ExtprocStream(None).handle(None)
    assert raised.value.reason == "empty"


async def test_the_stream_takes_events_made_by_hand() -> None:
    stream = await stream_for(
        "extproc: {default_policy: p, policies: {p: {mode_override: false, processors: "
        "[{plugin: headers, config: {request: {set: {x-a: '1'}}}}]}}}"
    )
    await stream.feed(headers_message(modes=("buffered", "none")))
    event = BodyEvent(
        phase=Phase.REQUEST_BODY, body=b"{}", end_of_stream=True, observability=False,
        metadata=None, modes=None,
    )
    [answer] = stream.handle(event)  # type: ignore[misc]
    assert answer.WhichOneof("response") == "request_body"
    assert (stream.received, stream.sent) == (2, 2)
    with pytest.raises(ProtocolError) as raised:  # the direction ended with that body
        stream.handle(event)
    assert raised.value.reason == "order"
