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
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extsvc.extproc.convert import event_of
from extsvc.extproc.model import HttpMessage
from extsvc.extproc.stream import ExtprocStream, ProtocolError
from extsvc.grpcutil import UNKNOWN_POLICY_LABEL, call_authority, printable
from extsvc.limits import Rejections, RequestLimits
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics

if TYPE_CHECKING:
    from extsvc.reload.runtime import RuntimeHolder

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessorService(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        *,
        limits: RequestLimits | None = None,
        max_streams: int = 4096,
    ) -> None:
        self._holder = holder
        self._limits = limits or RequestLimits()
        self._rejections = Rejections(metrics, "extproc")
        self._metrics = metrics
        #: per-request failure warnings, once per cause and interval (the metrics count all)
        self._throttle = LogThrottle()
        self._not_ready = metrics.hot(metrics.extproc_streams.labels("", "not-ready"))
        self._active = metrics.hot(metrics.extproc_active_streams)
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        #: streams open now, and the cap beyond which new ones are refused
        self.open_streams = 0
        self._max_streams = max_streams
        self._shed = metrics.hot(metrics.shed.labels("ext_proc"))

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
        try:
            read, write, handle = context.read, context.write, stream.handle
            eof = grpc.aio.EOF
            while True:
                between = True
                request = await read()
                if request is eof:
                    break
                between = False
                answers: Any = handle(event_of(request, limits))
                if answers.__class__ is HttpMessage:  # the policy's processors run on it
                    answers = await stream.run(answers)
                elif stream.unknown_policy and stream.received == 1:
                    self._log_unknown(stream.policy_name, stream.exchange.request_id)
                # answered: Envoy may reset the stream as soon as it has the last answer, even
                # while grpc is still completing the write
                between = True
                for response in answers:
                    await write(response)
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
            streams, received, sent, overrides = children
            streams.inc()
            received.inc(stream.received)
            sent.inc(stream.sent)
            if stream.override_sent:
                overrides.inc()
            runtime.leave()

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

    def _bind(self, policy: str, outcome: str) -> tuple[Any, Any, Any, Any]:
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
        )
        if len(self._children) < 1024:  # policy names come from config, but bound the cache
            self._children[(policy, outcome)] = children
        return children
