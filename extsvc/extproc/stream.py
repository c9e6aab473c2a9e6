"""One ext_proc stream as a state machine: fed events, returns the answers.

Sans-IO: the gRPC adapter in :mod:`extsvc.extproc.service` reads each ``ProcessingRequest``,
turns it into a small event (:func:`extsvc.extproc.convert.event_of`, see
:mod:`extsvc.extproc.events`) and writes what :meth:`ExtprocStream.handle` answers; the state
machine reads the events' plain fields and never a protobuf (answers are built by ``convert``).
The only thing awaited is the policy's processors. In a test, :meth:`ExtprocStream.feed` takes a
``ProcessingRequest`` and converts it the same way.

Protocol rules it keeps (sections of docs/internals/envoy-behaviour.md in brackets):

- every message gets exactly one answer of the matching phase, or an immediate response [§3.2];
  FULL_DUPLEX_STREAMED body chunks get ``streamed_response`` chunks instead (none for an empty
  intermediate chunk) [§3.3]; nothing at all in observability mode [§3.8];
- per direction: headers at most once and first, then body chunks, then trailers; nothing after
  the direction ended (``end_of_stream`` or trailers) [§3.2] -- a violation raises ProtocolError;
- a stream may begin with ``response_headers`` (a local reply of an earlier filter) [§3.1];
- after an immediate response Envoy ignores the stream, so later messages get no answer [§3.2];
- after CONTINUE_AND_REPLACE a direction's later messages (there should be none) pass unchanged;
- the first headers answer carries a ``mode_override`` switching off the phases no processor
  needs, both body modes spelled out [§3.4], never with FULL_DUPLEX_STREAMED or
  ``send_body_without_waiting_for_header_response`` (Envoy ignores it there);
- BUFFERED bodies whose length changes get ``content-length`` in the same answer [§3.3];
- with ``limits``, a header or trailer message over the caps is answered with an immediate
  response (431: the client's, 502: the upstream's) and ends the stream (docs/hardening.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from extsvc.extproc import convert
from extsvc.extproc.events import BodyEvent, Event, HeadersEvent, TrailersEvent
from extsvc.extproc.model import (
    OP_REMOVE,
    BodyMode,
    Exchange,
    HttpMessage,
    ImmediateReply,
    Phase,
)

if TYPE_CHECKING:
    from extsvc.extproc.pipeline import CompiledExtprocPolicy, ExtprocPolicies
    from extsvc.limits import Overflow, Rejections, RequestLimits
    from extsvc.observability.tracing import StepTrace


class ProtocolError(Exception):
    """Envoy sent something the protocol does not allow; the RPC ends with an error.

    :ivar reason: a short label for the metric (``empty``, ``order``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Direction:
    """One direction's progress (class-level defaults: made twice per stream, cheaply)."""

    headers_seen = False
    body_started = False
    #: a BUFFERED body was seen (whole, even when its message did not end the direction)
    body_whole = False
    done = False
    replaced = False

    def advance(self, phase: Phase) -> None:
        """Take one more message of this direction: check its order, note what it starts.

        (It ends the direction, ``done``, once answered: see ``ExtprocStream._ended``.)

        :raises ProtocolError: headers not first or twice, anything after the direction ended.
        """
        if self.done and not self.replaced:
            raise ProtocolError("order", f"{phase.value} after that direction ended")
        if phase.is_headers:
            if self.headers_seen or self.body_started:
                raise ProtocolError("order", f"{phase.value} after headers or body")
            self.headers_seen = True
        elif phase.is_body:
            self.body_started = True


_NOTHING: list[Any] = []
#: distinct header-only answers remembered per policy and headers phase (more: not remembered)
ANSWER_MEMO_SIZE = 64
#: ``[CONTINUE]`` per phase number, shared (callers only iterate answers)
_CONTINUE_ANSWERS: tuple[list[Any], ...] = tuple([answer] for answer in convert.CONTINUE)
#: the immediate response's status for a header or trailer message over the caps: the
#: client's (431) or the upstream's (502), as Envoy answers its own header limits
_OVER_CAP_STATUS: tuple[int, ...] = tuple(431 if phase.is_request else 502 for phase in Phase)


class _StreamExchange(Exchange):
    """An Exchange decoding protobuf headers and structs (set once, not per stream)."""

    _decode = staticmethod(convert.decode_headers)
    _decode_struct = staticmethod(convert.decode_struct_map)


class ExtprocStream:
    """The state of one ``Process`` stream.

    :param policies: the runtime's ext_proc policies (``None``: none configured).
    :param limits: the caps of header and trailer messages (docs/hardening.md), measured by
        :func:`convert.event_of`; one over them is answered with an immediate response (431 for
        the client's, 502 for the upstream's) and ends the stream, whatever the policy's
        ``on_error``. ``None``: no caps.
    :param rejections: where refusals over ``limits`` are counted and logged.
    :param authority: returns the gRPC call's ``:authority``; called at most once.
    :param clock: monotonic seconds (tests pass a fake one).
    """

    # Class-level defaults (a stream is made per HTTP request; an instance stores what changes).
    policy: CompiledExtprocPolicy | None = None
    policy_name = ""
    #: set when no policy could be chosen (the stream was answered with an error reply)
    unknown_policy = False
    #: an immediate response was sent: Envoy closes the stream and ignores later answers
    finished = False
    immediate_status: int | None = None
    #: the processor that answered the client itself, and the reply's details (for the log)
    immediate_step: str = ""
    immediate_reason: str = ""
    override_sent = False
    received = 0
    sent = 0
    _started = False
    _no_wait = False
    #: the mode_override is decided on the first headers answer (sent there or never)
    _override_open = True
    #: what finish() needs of the message step() handed out
    _pending: tuple[CompiledExtprocPolicy, _Direction, bool, bool, BodyMode, bool] | None = None
    limits: RequestLimits | None = None
    _rejections: Rejections | None = None

    def __init__(
        self,
        policies: ExtprocPolicies | None,
        *,
        limits: RequestLimits | None = None,
        rejections: Rejections | None = None,
        authority: Callable[[], str] = str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies = policies
        self._authority = authority
        if limits is not None:
            self.limits = limits
            self._rejections = rejections
        self.exchange: Exchange = _StreamExchange(clock=clock)
        self._request = _Direction()
        self._response = _Direction()

    async def feed(self, request: Any) -> list[Any]:
        """Process one ``ProcessingRequest``; the answers to send, in order (often exactly one).

        :raises ProtocolError: empty message, or a phase out of order.
        """
        out = self.step(request)
        if isinstance(out, HttpMessage):
            return await self.run(out)
        return out

    async def run(self, message: HttpMessage, trace: list[StepTrace] | None = None) -> list[Any]:
        """Run the policy's processors on the message :meth:`handle` handed out; its answers.

        ``trace``: see :meth:`CompiledExtprocPolicy.run`."""
        assert self._pending is not None
        by = await self._pending[0].run(message, trace)
        if message.reply is not None:
            self.immediate_step = by
            self.immediate_reason = message.reply.details
        return self.finish(message)

    def step(self, request: Any) -> list[Any] | HttpMessage:
        """:meth:`handle` of a ``ProcessingRequest`` (converted to its event here)."""
        return self.handle(convert.event_of(request, self.limits))

    def handle(self, event: Event | None) -> list[Any] | HttpMessage:
        """One message's event (:func:`convert.event_of`; ``None``: an empty message): the
        answers, or -- when the policy's processors must run -- the :class:`HttpMessage` for
        :meth:`run`, which runs them and gives the answers. The gRPC adapter calls these two
        (no coroutine per message when no processor runs).

        :raises ProtocolError: empty message, or a phase out of order.
        """
        if event is None:
            raise ProtocolError("empty", "ProcessingRequest without a request (empty oneof)")
        phase = event.phase
        if event.overflow is not None and not self.finished:
            return self._refuse(event, event.overflow)
        policy = self.policy
        if (policy is not None and not phase.is_headers and not policy.needs[phase.number]
                and not self.finished):
            answer = self._pass_through(event)
            if answer is not None:
                return answer
        self.received += 1
        if self.finished:
            return _NOTHING
        direction = self._request if phase.is_request else self._response
        direction.advance(phase)
        exchange = self.exchange
        if isinstance(event, HeadersEvent):
            exchange.take_headers(phase.is_request, event.headers)
            if event.attributes is not None:
                exchange.add_attributes(event.attributes)
        if event.metadata is not None:
            exchange.take_metadata(event.metadata)

        if not self._started:
            reply = self._start(event)
            if reply is not None:
                self.finished = True
                return self._emit(convert.immediate(reply), reply.status)

        policy = self.policy
        assert policy is not None
        observe_only = event.observability
        end_of_stream = event.end_of_stream
        body = b""
        if isinstance(event, HeadersEvent):
            body_mode, duplex = BodyMode.NONE, False
        else:
            body_mode = (
                exchange.request_body_mode if phase.is_request else exchange.response_body_mode
            )
            # a trailers message in FULL_DUPLEX_STREAMED may be preceded by a last body chunk
            duplex = body_mode is BodyMode.FULL_DUPLEX_STREAMED
            if isinstance(event, BodyEvent):
                body = event.body
                if body_mode is BodyMode.BUFFERED:
                    direction.body_whole = True
        if direction.replaced or not policy.needs[phase.number]:
            response: Any = _unchanged(phase, body, end_of_stream, duplex and phase.is_body)
        elif (fixed := policy.fixed[phase.number]) is not None:
            # Every processor's changes are fixed (headers phases): record them for later
            # readers (the decoded headers were reset above) and send the prebuilt answer.
            exchange.record_changes(phase.is_request, fixed.ops)
            response = fixed.answer
        else:
            message = HttpMessage(
                phase,
                exchange,
                body=body,
                end_of_stream=end_of_stream,
                raw_trailers=event.trailers if isinstance(event, TrailersEvent) else None,
            )
            self._pending = (policy, direction, observe_only, duplex, body_mode, end_of_stream)
            return message
        return self._answered(phase, direction, response, end_of_stream, observe_only)

    def finish(self, message: HttpMessage) -> list[Any]:
        """The answers to a message :meth:`handle` handed out, after its processors ran."""
        assert self._pending is not None
        policy, direction, observe_only, duplex, body_mode, end_of_stream = self._pending
        phase = message.phase
        if message.reply is not None:
            if observe_only:
                return _NOTHING
            self.finished = True
            return self._emit(convert.immediate(message.reply), message.reply.status)
        if message.replace_requested:
            direction.replaced = True
        response: Any
        if phase.is_trailers:
            response = convert.answer(message)
            if duplex and message.body and not observe_only:
                # a collected body's last chunk goes on before the trailers' answer
                chunk = convert.echo_chunk(phase.body_phase, message.body, False)
                self.sent += 1
                return [chunk, *self._answered(phase, direction, response, end_of_stream, observe_only)]
        elif duplex and not message.body and not end_of_stream:
            response = None  # nothing to pass on for this chunk yet
        elif (phase.is_headers and (memo := policy.answers[phase.number]) is not None
              and not message.replace_requested and not message.clear_route_cache_requested
              and all(op[0] <= OP_REMOVE for op in message.ops)):
            # Header changes only: the same changes get the same (shared) answer.
            key = tuple(message.ops)
            response = memo.get(key)
            if response is None:
                response = convert.answer(message)
                if len(memo) < ANSWER_MEMO_SIZE:
                    memo[key] = response
                else:  # this phase's answers keep differing: stop remembering them
                    policy.answers[phase.number] = None
        else:
            response = convert.answer(
                message,
                content_length=(
                    phase.is_body
                    and body_mode is BodyMode.BUFFERED
                    and direction.headers_seen
                    and "content-length" in message.headers
                ),
                streamed=duplex,
            )
        return self._answered(phase, direction, response, end_of_stream, observe_only)

    def _answered(
        self, phase: Phase, direction: _Direction, response: Any, end_of_stream: bool,
        observe_only: bool,
    ) -> list[Any]:
        self._ended(phase, direction, end_of_stream)
        if phase.is_headers and self._override_open and response is not None:
            self._override_open = False  # decided on the stream's first headers answer
            response = self._maybe_override(phase, response)
        if observe_only or response is None:
            return _NOTHING
        self.sent += 1
        return [response]

    @property
    def body_unfinished(self) -> bool:
        """Whether a body began and its end was never seen: not its last chunk, no trailers and
        not BUFFERED (the client or upstream went away mid-body, Envoy cut a BUFFERED_PARTIAL
        body at its buffer limit, or trailers were not sent)."""
        return any(
            d.body_started and not d.done and not d.body_whole and not d.replaced
            for d in (self._request, self._response)
        )

    def _ended(self, phase: Phase, direction: _Direction, end_of_stream: bool) -> None:
        """A message of ``direction`` was answered: the direction ends with ``end_of_stream``;
        a request message's answer is when the request went on to the upstream."""
        if end_of_stream:
            direction.done = True
        if phase.is_request:
            exchange = self.exchange
            exchange.request_done = exchange.clock()

    def _pass_through(self, event: Event) -> list[Any] | None:
        """A body or trailers message no processor of the policy needs: the prebuilt CONTINUE,
        with the bookkeeping :meth:`handle` would do for it. None: not that simple (full-duplex,
        observability mode, metadata to take in, a direction that ended or was replaced) --
        :meth:`handle` then takes it the long way."""
        phase = event.phase
        direction = self._request if phase.is_request else self._response
        if direction.done or direction.replaced or event.observability or event.metadata is not None:
            return None
        if phase.is_body:
            exchange = self.exchange
            mode = exchange.request_body_mode if phase.is_request else exchange.response_body_mode
            if mode is BodyMode.FULL_DUPLEX_STREAMED:
                return None
        direction.advance(phase)  # in order: a body or trailers of a direction not ended
        self.received += 1
        self._ended(phase, direction, event.end_of_stream)
        self.sent += 1
        return _CONTINUE_ANSWERS[phase.number]

    def _refuse(self, event: Event, overflow: Overflow) -> list[Any]:
        """A header or trailer message over the caps: an immediate response ends the stream.

        Not the policy's ``on_error`` path: ``continue`` there would send the request on
        without the processors that could not read it (docs/hardening.md).
        """
        phase = event.phase
        status = _OVER_CAP_STATUS[phase.number]
        self.received += 1
        self.finished = True
        exchange = self.exchange
        request_id = (  # the request headers, when they were under the caps (and not this message)
            exchange.request_id
            if phase is not Phase.REQUEST_HEADERS and exchange.has_request_headers else ""
        )
        if self._rejections is not None:
            self._rejections.record(overflow, str(status), self.policy_name, request_id)
        details = f"extsvc_{overflow.reason.replace('-', '_')}_over_limit"  # header_count_over_limit
        if event.observability:  # Envoy would not read an answer
            self.immediate_status = status
            return []
        return self._emit(convert.immediate(ImmediateReply(status, b"", {}, details, None)), status)

    def _emit(self, response: Any, status: int) -> list[Any]:
        self.immediate_status = status
        self.sent += 1
        return [response]

    def _start(self, event: Event) -> ImmediateReply | None:
        """First message: body modes from ``protocol_config``, then the policy.

        See docs/internals/envoy-behaviour.md §3.1.
        """
        self._started = True
        exchange = self.exchange
        modes = event.modes
        if modes is not None:
            exchange.request_body_mode, exchange.response_body_mode, self._no_wait = modes
        policies = self._policies
        if policies is None:
            name, policy = "", None
        else:
            name, policy = policies.select(self._authority, exchange)
        self.policy_name = name
        exchange.policy = name
        if policy is None:
            # Never a silent pass-through of an unknown policy: fail closed.
            self.unknown_policy = True
            detail = f"unknown ext_proc policy {name!r}" if name else "no ext_proc policy chosen"
            return ImmediateReply(500, b"", {}, f"extsvc: {detail}", None)
        self.policy = policy
        return None

    def _maybe_override(self, phase: Phase, response: Any) -> Any:
        """Add ``mode_override`` to the first headers answer when it saves messages."""
        policy = self.policy
        if policy is None or not policy.mode_override or self._no_wait:
            return response
        exchange = self.exchange
        configured = (exchange.request_body_mode, exchange.response_body_mode)
        if BodyMode.FULL_DUPLEX_STREAMED in configured:
            # Envoy ignores it with FULL_DUPLEX_STREAMED: docs/internals/envoy-behaviour.md §3.4
            return response
        wanted = policy.wanted
        request_body = _body_mode(configured[0], Phase.REQUEST_BODY, policy)
        response_body = _body_mode(configured[1], Phase.RESPONSE_BODY, policy)
        # Response headers are skipped only when no response body is asked for either: with
        # them skipped, Envoy 1.40 never ends a BUFFERED_PARTIAL response over its buffer limit
        # and cuts a BUFFERED one (docs/internals/envoy-behaviour.md §3.4).
        skip_headers = (
            phase is Phase.REQUEST_HEADERS and Phase.RESPONSE_HEADERS not in wanted
            and response_body is BodyMode.NONE
        )
        request_trailers = Phase.REQUEST_TRAILERS in wanted
        response_trailers = Phase.RESPONSE_TRAILERS in wanted
        if ((request_body, response_body) == configured and not skip_headers
                and not request_trailers and not response_trailers):
            return response
        self.override_sent = True
        exchange.request_body_mode, exchange.response_body_mode = request_body, response_body
        key = (id(response), request_body, response_body, skip_headers)
        fixed = policy.fixed[phase.number]
        shared = response is convert.CONTINUE[phase.number] or (
            fixed is not None and response is fixed.answer
        )
        # A shared answer's mode_override copy is built once per policy and body modes.
        overridden = policy.override_memo.get(key) if shared else None
        if overridden is None:
            overridden = convert.with_mode_override(
                response,
                request_body=request_body,
                response_body=response_body,
                skip_response_headers=skip_headers,
                request_trailers=request_trailers,
                response_trailers=response_trailers,
            )
            if shared:
                policy.override_memo[key] = overridden
        return overridden


_COLLECTED_BY_ENVOY = (BodyMode.STREAMED, BodyMode.BUFFERED_PARTIAL)


def _body_mode(configured: BodyMode, phase: Phase, policy: CompiledExtprocPolicy) -> BodyMode:
    """The body mode the override asks for: NONE when nothing reads the body; BUFFERED in
    place of a streamed mode for a body a processor needs whole, and in place of a response's
    BUFFERED_PARTIAL (Envoy 1.40 may never end a BUFFERED_PARTIAL response over its buffer
    limit, whatever the answer: docs/internals/envoy-behaviour.md §3.3); else the configured one."""
    if phase not in policy.wanted:
        return BodyMode.NONE
    if configured is BodyMode.BUFFERED_PARTIAL and phase is Phase.RESPONSE_BODY:
        return BodyMode.BUFFERED
    if phase in policy.whole_bodies and configured in _COLLECTED_BY_ENVOY:
        return BodyMode.BUFFERED
    return configured


def _unchanged(phase: Phase, body: bytes, end_of_stream: bool, duplex: bool) -> Any:
    """The unchanged answer; in FULL_DUPLEX_STREAMED the chunk itself goes back (or nothing)."""
    if not duplex:
        return convert.CONTINUE[phase.number]
    if not body and not end_of_stream:
        return None
    return convert.echo_chunk(phase, body, end_of_stream)
