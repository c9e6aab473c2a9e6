"""OpenTelemetry tracing of the three services (off unless ``tracing_endpoint`` is set).

Each RPC continues the trace its caller sent in the gRPC metadata -- W3C ``traceparent`` /
``tracestate`` (Envoy's OpenTelemetry tracer) or B3 (``x-b3-*`` from Envoy's Zipkin tracer, or
a single ``b3`` header) -- with one SERVER span named ``<gRPC service>/<method>`` and, beneath
it, one span per policy step or ext_proc processor (ext_proc: per message phase, with its
processors beneath). Spans go to an OTLP/gRPC collector in batches, from a thread.

Sampling: a trace whose caller decided (the sampled flag of its context) follows that decision;
a trace that starts here is sampled at ``tracing_sample_ratio``.

When tracing is off nothing of OpenTelemetry is imported and the services pay one ``is None``
test per RPC. On the request path nothing builds spans while the steps run: they note
``(name, kind, outcome, start, end)`` in a list, and the spans are made after the answer,
with those times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from time import perf_counter
from typing import Any

from extsvc.observability.metrics import Metrics

log = logging.getLogger(__name__)

#: Seconds :meth:`Tracing.stop` waits for the last spans to be exported.
STOP_TIMEOUT_S = 3.0

#: Metadata keys that carry a caller's trace context (W3C, B3 multi and single header).
_TRACE_KEYS = frozenset({"traceparent", "x-b3-traceid", "b3"})


def _not_sampled(carrier: dict[str, str]) -> bool:
    """Whether the caller's context says "not sampled" (its trace is then not recorded)."""
    parent = carrier.get("traceparent")
    if parent is not None:
        return parent.endswith("-00")
    sampled = carrier.get("x-b3-sampled")
    if sampled is not None:
        return sampled == "0"
    single = carrier.get("b3", "")
    return single == "0" or (single.count("-") >= 2 and single.split("-")[2] == "0")


#: One step's trace: (name, kind, outcome, perf_counter start, perf_counter end).
StepTrace = tuple[str, str, str, float, float]


class _Api:
    """OpenTelemetry's names the spans need, imported once, when tracing starts."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.in_context = trace.set_span_in_context
        self.internal = SpanKind.INTERNAL
        self.server = SpanKind.SERVER
        self.Status = Status
        self.error = StatusCode.ERROR


class RpcSpan:
    """The SERVER span of one RPC and what its children need (its clock origins)."""

    __slots__ = ("_api", "_context", "_ns0", "_pc0", "_tracer", "span")

    def __init__(self, api: _Api, tracer: Any, span: Any, ns0: int, pc0: float) -> None:
        self._api = api
        self._tracer = tracer
        self.span = span
        self._ns0 = ns0
        self._pc0 = pc0
        self._context: Any = None

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    def _ns(self, pc: float) -> int:
        return self._ns0 + int((pc - self._pc0) * 1e9)

    def _parent(self) -> Any:
        if self._context is None:
            self._context = self._api.in_context(self.span)
        return self._context

    def child(
        self, name: str, start: float, end: float, attributes: dict[str, Any], error: str = "",
        steps: Sequence[StepTrace] = (),
    ) -> None:
        """A finished child span (times from ``perf_counter``), with ``steps`` beneath it."""
        api = self._api
        span = self._tracer.start_span(
            name, context=self._parent(), kind=api.internal, attributes=attributes,
            start_time=self._ns(start),
        )
        if error:
            span.set_status(api.Status(api.error, error))
        if steps:
            self._steps(api.in_context(span), steps)
        span.end(end_time=self._ns(end))

    def steps(self, steps: Iterable[StepTrace]) -> None:
        """One child span per step."""
        self._steps(self._parent(), steps)

    def _steps(self, parent: Any, steps: Iterable[StepTrace]) -> None:
        api = self._api
        start_span = self._tracer.start_span
        for name, kind, outcome, start, end in steps:
            span = start_span(
                f"step {name}", context=parent, kind=api.internal,
                attributes={"extsvc.step.name": name, "extsvc.step.kind": kind,
                            "extsvc.step.outcome": outcome},
                start_time=self._ns(start),
            )
            if outcome in ("error", "timeout"):
                span.set_status(api.Status(api.error, outcome))
            span.end(end_time=self._ns(end))

    def finish(self, attributes: dict[str, Any], grpc_code: int = 0, error: str = "") -> None:
        """Set the RPC's outcome and end the span now."""
        span = self.span
        attributes["rpc.grpc.status_code"] = grpc_code
        span.set_attributes(attributes)
        if error:
            span.set_status(self._api.Status(self._api.error, error))
        span.end(end_time=self._ns(perf_counter()))


class Tracing:
    """The process's tracer: OTLP/gRPC export, caller's context from gRPC metadata.

    :param endpoint: the collector, ``http://host:4317`` (plain) or ``https://...`` (TLS); the
        standard ``OTEL_EXPORTER_OTLP_*`` variables set headers, certificates and compression.
    :param sample_ratio: share of the traces starting here that are sampled.
    :param service_name: ``service.name`` of the spans' resource.
    :param descriptor_values: put rate-limit descriptor values on spans (off: keys only).
    :param exporter: a span exporter to use instead (tests).
    :param metrics: where exported and failed spans are counted
        (``extsvc_tracing_spans_exported_total{result}``).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        sample_ratio: float = 1.0,
        service_name: str = "extsvc",
        descriptor_values: bool = False,
        export_timeout_s: float = 5.0,
        exporter: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from extsvc.observability.metrics import _version

        self.descriptor_values = descriptor_values
        self.endpoint = endpoint
        self._api = _Api()
        self._ratio = sample_ratio
        resource = Resource.create({
            "service.name": service_name,
            "service.version": _version(),
            "service.instance.id": f"{socket.gethostname()}/{os.getpid()}",
        })
        self._provider = TracerProvider(
            # roots: the ratio is applied in begin(), before the SDK is asked
            resource=resource, sampler=ParentBased(ALWAYS_ON)
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=export_timeout_s)
            # its retries log a warning each; a failed batch is logged (ERROR) and counted
            logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(
                logging.ERROR
            )
        if metrics is not None:
            exporter = _counting(exporter, metrics)
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=4096, schedule_delay_millis=500,
            export_timeout_millis=int(export_timeout_s * 1000),
        ))
        self._tracer = self._provider.get_tracer("extsvc", _version())
        # traceparent last: when a caller sends both, W3C wins
        self._propagator = CompositePropagator(
            [B3MultiFormat(), B3SingleFormat(), TraceContextTextMapPropagator()]
        )

    def begin(self, service: str, method: str, context: Any) -> RpcSpan | None:
        """The SERVER span of an RPC, child of the caller's context; None when not sampled.

        The sampling decision is made here first, from the metadata alone, so that a call not
        sampled costs a dict and a random number, not OpenTelemetry's context machinery: a
        caller's flag that says "not sampled" (``traceparent`` ``-00``, ``x-b3-sampled: 0``,
        ``b3: ...-0``) ends it, and a call without a caller's context is sampled at the
        ratio. What remains goes to the SDK, whose sampler follows the caller's flag.
        """
        try:
            carrier = dict(context.invocation_metadata() or ())
        except Exception:  # noqa: BLE001 (a context without metadata: a trace of our own)
            carrier = {}
        if _TRACE_KEYS.isdisjoint(carrier):
            if self._ratio < 1.0 and random.random() >= self._ratio:  # noqa: S311 (sampling)
                return None
            parent = None
        elif _not_sampled(carrier):
            return None
        else:
            parent = self._propagator.extract(carrier)
        ns0, pc0 = time.time_ns(), perf_counter()
        span = self._tracer.start_span(
            f"{service}/{method}", context=parent, kind=self._api.server, start_time=ns0,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        if not span.is_recording():
            return None
        return RpcSpan(self._api, self._tracer, span, ns0, pc0)

    async def stop(self) -> None:
        """Export what is queued (bounded by :data:`STOP_TIMEOUT_S`) and stop."""
        # A daemon thread: a collector that hangs cannot hold up the process's exit.
        stopper = threading.Thread(target=self._provider.shutdown, name="tracing-stop", daemon=True)
        stopper.start()
        await asyncio.to_thread(stopper.join, STOP_TIMEOUT_S)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export every finished span now (tests, benchmarks)."""
        return bool(self._provider.force_flush(int(timeout_s * 1000)))


def _counting(exporter: Any, metrics: Metrics) -> Any:
    """``exporter``, counting the spans of each batch by result (``ok``, ``failed``)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    ok = metrics.spans_exported.labels("ok")
    failed = metrics.spans_exported.labels("failed")

    class Counting(SpanExporter):
        def export(self, spans: Any) -> Any:
            result = exporter.export(spans)
            (ok if result is SpanExportResult.SUCCESS else failed).inc(len(spans))
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(exporter.force_flush(timeout_millis))

    return Counting()

