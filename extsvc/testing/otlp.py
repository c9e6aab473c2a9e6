"""A small OTLP/gRPC trace collector on loopback, for tests and benchmarks.

It accepts ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` from anything (Envoy's
OpenTelemetry tracer, extsvc's exporter) and keeps the spans it receives, flattened, so a test
can wait for them and follow their parent links::

    with OtlpCollector() as collector:
        ... # point the tracers at collector.endpoint
        spans = collector.wait_for(lambda spans: any(s.name == "x" for s in spans))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received: ids in hex, attributes as plain values."""

    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int  # 1 internal, 2 server, 3 client
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    start_ns: int = 0
    end_ns: int = 0


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class OtlpCollector:
    """:param max_spans: spans kept (the oldest go first)."""

    def __init__(self, max_spans: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._max = max_spans
        self.exports = 0
        self._server: Any = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                collector._take(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0.5).wait()
            self._server = None

    def __enter__(self) -> Self:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take(self, request: Any) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = ""
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = _value(attribute.value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=service, name=span.name, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        status_code=span.status.code, start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    ))
        with self._lock:
            self.exports += 1
            self._spans.extend(received)
            if len(self._spans) > self._max:
                del self._spans[: len(self._spans) - self._max]

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """The spans received once ``done(spans)`` holds. :raises TimeoutError: it never did."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({f"{s.service}:{s.name}" for s in spans})
                raise TimeoutError(f"spans not complete after {timeout:.0f}s; got {names}")
            time.sleep(0.05)
