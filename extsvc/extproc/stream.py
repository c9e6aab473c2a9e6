"""One ext_proc stream as a state machine: fed ``ProcessingRequest``s, returns the answers.

No I/O here (the gRPC adapter in :mod:`extsvc.extproc.service` reads and writes); the only thing
awaited is the policy's processors. Feed it messages in a test and look at what comes back.

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
- BUFFERED bodies whose length changes get ``content-length`` in the same answer [§3.3].
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from extsvc.extproc import convert
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
    done = False
    replaced = False


_NOTHING: list[Any] = []
#: distinct header-only answers remembered per policy and headers phase (more: not remembered)
ANSWER_MEMO_SIZE = 64
_PHASE_OF = convert.PHASE_OF
#: ``[CONTINUE]`` per phase number, shared (callers only iterate answers)
_CONTINUE_ANSWERS: tuple[list[Any], ...] = tuple([answer] for answer in convert.CONTINUE)


class _StreamExchange(Exchange):
    """An Exchange decoding protobuf headers and structs (set once, not per stream)."""

    _decode = staticmethod(convert.decode_headers)
    _decode_struct = staticmethod(convert.decode_struct_map)


class ExtprocStream:
    """The state of one ``Process`` stream.

    :param policies: the runtime's ext_proc policies (``None``: none configured).
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
    override_sent = False
    received = 0
    sent = 0
    _started = False
    _no_wait = False
    #: the mode_override is decided on the first headers answer (sent there or never)
    _override_open = True
    #: what finish() needs of the message step() handed out
    _pending: tuple[CompiledExtprocPolicy, _Direction, bool, bool, BodyMode, bool] | None = None

    def __init__(
        self,
        policies: ExtprocPolicies | None,
        *,
        authority: Callable[[], str] = str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies = policies
        self._authority = authority
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

    async def run(self, message: HttpMessage) -> list[Any]:
        """Run the policy's processors on the message :meth:`step` handed out; its answers."""
        assert self._pending is not None
        await self._pending[0].run(message)
        return self.finish(message)

    def step(self, request: Any) -> list[Any] | HttpMessage:
        """:meth:`feed` without awaiting: the answers, or -- when the policy's processors must
        run -- the :class:`HttpMessage` for :meth:`run`, which runs them and gives the answers.
        The gRPC adapter calls these two (no coroutine per message when no processor runs).

        :raises ProtocolError: empty message, or a phase out of order.
        """
        phase = _PHASE_OF.get(request.WhichOneof("request"))  # an empty oneof gives None
        if phase is None:
            raise ProtocolError("empty", "ProcessingRequest without a request (empty oneof)")
        policy = self.policy
        if (policy is not None and not phase.is_headers and not policy.needs[phase.number]
                and not self.finished):
            answer = self._pass_through(phase, request)
            if answer is not None:
                return answer
        self.received += 1
        if self.finished:
            return _NOTHING
        direction = self._request if phase.is_request else self._response
        self._check_order(phase, direction)
        inner = getattr(request, phase.field)
        exchange = self.exchange
        if phase.is_headers:
            if phase.is_request:
                exchange._raw_request_headers = inner.headers
                exchange._request_headers = None
            else:
                exchange._raw_response_headers = inner.headers
                exchange._response_headers = None
            if len(request.attributes):
                exchange.add_attributes(request.attributes)
        if request.HasField("metadata_context"):
            metadata = convert.metadata_of(request)
            if len(metadata):
                exchange._metadata_raw = metadata
                exchange._metadata = None

        if not self._started:
            reply = self._start(request)
            if reply is not None:
                self.finished = True
                return self._emit(convert.immediate(reply), reply.status)

        policy = self.policy
        assert policy is not None
        observe_only = request.observability_mode
        if phase.is_body:
            body_mode = (
                exchange.request_body_mode if phase.is_request else exchange.response_body_mode
            )
            duplex = body_mode is BodyMode.FULL_DUPLEX_STREAMED
        else:
            body_mode, duplex = BodyMode.NONE, False
        end_of_stream = phase.is_trailers or bool(getattr(inner, "end_of_stream", False))
        if direction.replaced:
            response: Any = _unchanged(phase, inner, duplex)
        elif not policy.needs[phase.number]:
            response = _unchanged(phase, inner, duplex)
        elif (fixed := policy.fixed[phase.number]) is not None:
            # Every processor's changes are fixed (headers phases): record them for later
            # readers (the decoded headers were reset above) and send the prebuilt answer.
            (exchange._request_ops if phase.is_request else exchange._response_ops).extend(fixed.ops)
            response = fixed.answer
        else:
            message = HttpMessage(
                phase,
                exchange,
                body=inner.body if phase.is_body else b"",
                end_of_stream=end_of_stream,
                raw_trailers=inner.trailers if phase.is_trailers else None,
            )
            self._pending = (policy, direction, observe_only, duplex, body_mode, end_of_stream)
            return message
        return self._answered(phase, direction, response, end_of_stream, observe_only)

    def finish(self, message: HttpMessage) -> list[Any]:
        """The answers to a message :meth:`step` handed out, after its processors ran."""
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
        if duplex and not message.body and not end_of_stream:
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
        if end_of_stream:
            direction.done = True
        if phase.is_headers and self._override_open and response is not None:
            self._override_open = False  # decided on the stream's first headers answer
            response = self._maybe_override(phase, response)
        if phase.is_request:
            exchange = self.exchange
            exchange.request_done = exchange.clock()
        if observe_only or response is None:
            return _NOTHING
        self.sent += 1
        return [response]

    def _pass_through(self, phase: Phase, request: Any) -> list[Any] | None:
        """A body or trailers message no processor of the policy needs: the prebuilt CONTINUE,
        with the bookkeeping :meth:`feed` would do for it. None: not that simple (full-duplex,
        observability mode, metadata to take in, a direction that ended or was replaced) --
        :meth:`feed` then takes it the long way."""
        direction = self._request if phase.is_request else self._response
        if (direction.done or direction.replaced or request.observability_mode
                or request.HasField("metadata_context")):
            return None
        exchange = self.exchange
        if phase.is_body:
            mode = exchange.request_body_mode if phase.is_request else exchange.response_body_mode
            if mode is BodyMode.FULL_DUPLEX_STREAMED:
                return None
            direction.body_started = True
            if getattr(request, phase.field).end_of_stream:
                direction.done = True
        else:  # trailers end their direction
            direction.done = True
        self.received += 1
        if phase.is_request:
            exchange.request_done = exchange.clock()
        self.sent += 1
        return _CONTINUE_ANSWERS[phase.number]

    def _emit(self, response: Any, status: int) -> list[Any]:
        self.immediate_status = status
        self.sent += 1
        return [response]

    def _check_order(self, phase: Phase, direction: _Direction) -> None:
        if direction.done and not direction.replaced:
            raise ProtocolError("order", f"{phase.value} after that direction ended")
        if phase.is_headers:
            if direction.headers_seen or direction.body_started:
                raise ProtocolError("order", f"{phase.value} after headers or body")
            direction.headers_seen = True
        elif phase.is_body:
            direction.body_started = True

    def _start(self, request: Any) -> ImmediateReply | None:
        """First message: body modes from ``protocol_config``, then the policy.

        See docs/internals/envoy-behaviour.md §3.1.
        """
        self._started = True
        exchange = self.exchange
        modes = convert.body_modes(request)
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
        needs = policy.phases
        request_body = configured[0] if Phase.REQUEST_BODY in needs else BodyMode.NONE
        response_body = configured[1] if Phase.RESPONSE_BODY in needs else BodyMode.NONE
        skip_headers = phase is Phase.REQUEST_HEADERS and Phase.RESPONSE_HEADERS not in needs
        if (request_body, response_body) == configured and not skip_headers:
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
                request_trailers=Phase.REQUEST_TRAILERS in needs,
                response_trailers=Phase.RESPONSE_TRAILERS in needs,
            )
            if shared:
                policy.override_memo[key] = overridden
        return overridden


def _unchanged(phase: Phase, inner: Any, duplex: bool) -> Any:
    """The unchanged answer; in FULL_DUPLEX_STREAMED the chunk itself goes back (or nothing)."""
    if not duplex:
        return convert.CONTINUE[phase.number]
    if not inner.body and not inner.end_of_stream:
        return None
    return convert.echo_chunk(phase, inner.body, inner.end_of_stream)
