"""The thin gRPC adapter for ``envoy.service.ext_proc.v3.ExternalProcessor``.

Reads each ``ProcessingRequest``, converts it to its event (:func:`convert.event_of`, which
also measures header maps against the caps), feeds that to the stream's state machine
(:mod:`extsvc.extproc.stream`) and writes what comes back. Returns when Envoy half-closes
(docs/internals/envoy-behaviour.md §3.1). Not ready (no config yet) and protocol violations
end the RPC with a gRPC error, so Envoy's ``failure_mode_allow`` / ``status_on_error`` decide.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extsvc.extproc.convert import event_of
from extsvc.extproc.model import HttpMessage
from extsvc.extproc.stream import ExtprocStream, ProtocolError
from extsvc.grpcutil import UNKNOWN_POLICY_LABEL, call_authority, printable
from extsvc.limits import Rejections, RequestLimits
from extsvc.observability.decisions import (
    DecisionLog,
    DecisionRecord,
    bounded,
    route_path,
    trace_id_of,
)
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics

if TYPE_CHECKING:
    from extsvc.observability.tracing import RpcSpan, StepTrace, Tracing
    from extsvc.reload.runtime import RuntimeHolder

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
#: stream outcomes the decision log leaves out unless its level is ``all``
_ROUTINE = frozenset({"ok", "unselected"})
#: the gRPC status a stream ended with, by outcome (the rest: OK)
_OUTCOME_CODES = {"protocol-error": 3, "cancelled": 1}
_CODE_NAMES = {0: "OK", 1: "CANCELLED", 3: "INVALID_ARGUMENT"}


class ExternalProcessorService(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        *,
        limits: RequestLimits | None = None,
        max_streams: int = 4096,
        decisions: DecisionLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """:param decisions: the decision log (immediate responses and failed streams; every
            stream at level ``all``).
        :param tracing: the tracer (None: off)."""
        self._holder = holder
        self._limits = limits or RequestLimits()
        self._rejections = Rejections(metrics, "extproc")
        self._metrics = metrics
        #: per-request failure warnings, once per cause and interval (the metrics count all)
        self._throttle = LogThrottle()
        self._not_ready = metrics.hot(metrics.extproc_streams.labels("", "not-ready"))
        self._active = metrics.hot(metrics.extproc_active_streams)
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any, Any]] = {}
        #: streams open now, and the cap beyond which new ones are refused
        self.open_streams = 0
        self._max_streams = max_streams
        self._shed = metrics.hot(metrics.shed.labels("ext_proc"))
        self._decisions = decisions if decisions is not None and decisions.active else None
        self._tracing = tracing
        self._durations = metrics.request_durations("ext_proc")
        self._refused = {
            code: metrics.hot(metrics.grpc_handled.labels("ext_proc", "Process", code))
            for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
        }

    async def Process(self, request_iterator: Any, context: Any) -> None:
        # Errors end the RPC with set_code() and a return, never context.abort(): abort raises,
        # and grpc keeps that exception on the call, whose traceback holds this frame and so the
        # call again -- a reference cycle per failed stream (its messages included) until the
        # cyclic GC runs.
        if self.open_streams >= self._max_streams:
            self._refuse_overloaded(context)
            return
        runtime = self._holder.current
        if runtime is None:
            self._not_ready.inc()
            held = self._throttle.allow("not-ready")
            if held is not None:
                log.warning("ext_proc stream before the first config load: ending it with "
                            "UNAVAILABLE (%d more since the last report)", held)
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("extsvc: no config loaded yet")
            self._refused["UNAVAILABLE"].inc()
            return
        runtime.enter()
        self.open_streams += 1
        self._active.inc()
        limits = self._limits
        stream = ExtprocStream(
            runtime.extproc,
            limits=limits,
            rejections=self._rejections,
            authority=lambda: call_authority(context),
        )
        outcome = "ok"
        between = True
        tracing = self._tracing
        span = None if tracing is None else tracing.begin(SERVICE_NAME, "Process", context)
        durations = self._durations
        duration: Any = None  # the policy's request-duration child, once the policy is known
        latency = 0.0  # of the last message answered
        protocol_error = ""
        try:
            read, write, handle = context.read, context.write, stream.handle
            eof = grpc.aio.EOF
            while True:
                between = True
                request = await read()
                if request is eof:
                    break
                between = False
                started = perf_counter()
                answers: Any = handle(event_of(request, limits))
                if answers.__class__ is HttpMessage:  # the policy's processors run on it
                    if span is None:
                        answers = await stream.run(answers)
                    else:
                        answers = await self._run_traced(stream, answers, span, started)
                elif stream.unknown_policy and stream.received == 1:
                    self._log_unknown(stream.policy_name, stream.exchange.request_id)
                # answered: Envoy may reset the stream as soon as it has the last answer, even
                # while grpc is still completing the write
                between = True
                for response in answers:
                    await write(response)
                latency = perf_counter() - started
                if duration is None:  # the policy is known once the first message is read
                    duration = durations.get(
                        UNKNOWN_POLICY_LABEL if stream.unknown_policy and stream.policy_name
                        else stream.policy_name
                    )
                duration.observe(latency)
        except ProtocolError as exc:
            outcome = "protocol-error"
            held = self._throttle.allow(f"protocol-error:{exc.reason}")  # a fixed set of reasons
            if held is not None:
                log.warning(
                    "ext_proc protocol error (%s) on policy %s: %s (%d more since the last report)",
                    exc.reason, printable(stream.policy_name) if stream.policy_name else "-",
                    str(exc), held,  # the text: a record keeping exc would keep its frames
                )
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(f"extsvc: {exc}")
            protocol_error = exc.reason
        except asyncio.CancelledError:
            # Envoy reset the stream. Between messages that is one of its two ways of ending a
            # stream (the other is a half-close), judged below by what the stream did; while a
            # message was being processed it means Envoy stopped waiting for the answer
            # (message_timeout, or the client went away).
            if not between:
                outcome = "cancelled"
            raise
        finally:
            self.open_streams -= 1
            self._active.dec()
            label = stream.policy_name
            # What the stream did, not how Envoy ended it (half-close or reset).
            if outcome == "ok":
                if stream.unknown_policy:
                    outcome = "unknown-policy"
                    if label:  # a name from the request: one label value for all of them
                        label = UNKNOWN_POLICY_LABEL
                elif stream.immediate_status is not None:
                    outcome = "immediate"
                elif not label:  # no policy chosen: passed through (unselected)
                    outcome = "unselected"
                elif stream.body_unfinished:  # a body's end never came (docs/extproc.md)
                    outcome = "incomplete"
                    self._log_incomplete(label, stream.exchange.request_id)
            elif stream.unknown_policy and label:
                label = UNKNOWN_POLICY_LABEL
            children = self._children.get((label, outcome))
            if children is None:
                children = self._bind(label, outcome)
            streams, received, sent, overrides, handled = children
            streams.inc()
            received.inc(stream.received)
            sent.inc(stream.sent)
            if stream.override_sent:
                overrides.inc()
            handled.inc()
            runtime.leave()
            decisions = self._decisions
            if decisions is not None and (outcome not in _ROUTINE or decisions.everything):
                decisions.record(
                    self._record(stream, label, outcome, latency, span, protocol_error)
                )
            if span is not None:
                self._finish_span(span, stream, label, outcome)

    def _refuse_overloaded(self, context: Any) -> None:
        """A stream past ``max_extproc_streams``: RESOURCE_EXHAUSTED before reading anything, so
        Envoy's ``failure_mode_allow`` / ``status_on_error`` decide."""
        self._shed.inc()
        held = self._throttle.allow("shed")
        if held is not None:
            log.warning(
                "%d ext_proc streams open (max_extproc_streams): refusing new ones with "
                "RESOURCE_EXHAUSTED (%d more since the last report)", self.open_streams, held,
            )
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details("extsvc: too many ext_proc streams open")
        self._refused["RESOURCE_EXHAUSTED"].inc()

    def _log_unknown(self, name: str, request_id: str) -> None:
        # throttled by cause, not by name: 20,000 names are one report per interval
        held = self._throttle.allow("unknown-policy" if name else "no-policy")
        if held is not None:
            log.warning(
                "ext_proc stream answered 500: %s (%d more since the last report) [request_id=%s]",
                f"unknown policy {printable(name)}" if name
                else "no policy chosen and no extproc.default_policy",
                held, request_id,
            )

    def _log_incomplete(self, policy: str, request_id: str) -> None:
        held = self._throttle.allow("incomplete")
        if held is not None:
            log.warning(
                "ext_proc stream of policy %s ended before the end of a body it was sent: the "
                "client or upstream went away, Envoy cut the body at its buffer limit "
                "(BUFFERED_PARTIAL), or trailers ended it that Envoy did not send; a processor "
                "holding chunks back lost them (%d more since the last report) [request_id=%s]",
                printable(policy), held, request_id,
            )

    async def _run_traced(
        self, stream: ExtprocStream, message: HttpMessage, span: RpcSpan, started: float
    ) -> list[Any]:
        """:meth:`ExtprocStream.run`, with a span for the message's phase and its processors."""
        steps: list[StepTrace] = []
        error = ""
        try:
            return await stream.run(message, steps)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            attributes: dict[str, Any] = {
                "extsvc.phase": message.phase.value, "extsvc.policy": stream.policy_name,
            }
            if message.reply is not None:
                attributes["extsvc.status"] = message.reply.status
            span.child(f"ext_proc {message.phase.value}", started, perf_counter(), attributes,
                       error=error, steps=steps)

    def _record(
        self, stream: ExtprocStream, policy: str, outcome: str, latency: float,
        span: RpcSpan | None, protocol_error: str,
    ) -> DecisionRecord:
        """The decision log's record of one ext_proc stream (an immediate response, a failure,
        or -- at level ``all`` -- any stream)."""
        decisions = self._decisions
        assert decisions is not None
        exchange = stream.exchange
        headers = exchange.request_headers if exchange.has_request_headers else {}
        reason = stream.immediate_reason
        if outcome == "protocol-error":
            reason = f"protocol error: {protocol_error}"
        elif outcome == "unknown-policy":
            reason = "unknown policy" if stream.policy_name else "no policy chosen"
        elif outcome == "incomplete":
            reason = "a body's end never came"
        source = exchange.attributes.get("source.address") if exchange.has_request_headers else ""
        return DecisionRecord(
            decisions.clock(), "ext_proc", policy, outcome, stream.immediate_status or 0,
            stream.immediate_step, bounded(reason), latency,
            bounded(exchange.request_id, 128) if headers else "",
            span.trace_id if span is not None else trace_id_of(headers.get),
            bounded(headers.get(":authority", ""), 256), route_path(headers.get(":path", "")),
            bounded(headers.get(":method", ""), 16), bounded(str(source or ""), 64),
            decisions.header_detail(headers) if decisions.headers else (), decisions.worker,
        )

    @staticmethod
    def _finish_span(span: RpcSpan, stream: ExtprocStream, policy: str, outcome: str) -> None:
        attributes: dict[str, Any] = {"extsvc.policy": policy, "extsvc.outcome": outcome,
                                      "extsvc.messages": stream.received}
        if stream.immediate_status is not None:
            attributes["extsvc.status"] = stream.immediate_status
            if stream.immediate_step:
                attributes["extsvc.step"] = stream.immediate_step
        code = _OUTCOME_CODES.get(outcome, 0)
        span.finish(attributes, grpc_code=code,
                    error=outcome if outcome in ("protocol-error", "cancelled") else "")

    def _bind(self, policy: str, outcome: str) -> tuple[Any, Any, Any, Any, Any]:
        """The metric children of one (policy, outcome), bound once (``labels()`` is not free).

        ``policy`` is a configured name, "" or :data:`UNKNOWN_POLICY_LABEL`, never a name taken
        from a request, so the label set is bounded by the config.
        """
        name = policy
        m = self._metrics
        children = (
            m.hot(m.extproc_streams.labels(name, outcome)),
            m.hot(m.extproc_messages.labels(name, "received")),
            m.hot(m.extproc_messages.labels(name, "sent")),
            m.hot(m.extproc_mode_overrides.labels(name)),
            m.hot(m.grpc_handled.labels("ext_proc", "Process", _CODE_NAMES[_OUTCOME_CODES.get(outcome, 0)])),
        )
        if len(self._children) < 1024:  # policy names come from config, but bound the cache
            self._children[(policy, outcome)] = children
        return children
