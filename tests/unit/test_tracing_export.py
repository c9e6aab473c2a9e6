"""The tracer's export: spans counted by result, and a collector that is down costs neither the
calls nor the shutdown more than its bounds."""

from __future__ import annotations

import time

from extsvc.observability.metrics import Metrics
from extsvc.observability.tracing import Tracing
from extsvc.testing.harness import free_port
from extsvc.testing.otlp import OtlpCollector


class _Call:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def _three_spans(tracing: Tracing) -> None:
    span = tracing.begin("svc", "Method", _Call())
    assert span is not None
    now = time.perf_counter()
    span.steps([("a", "kind", "allow", now, now + 0.001), ("b", "kind", "error", now, now + 0.002)])
    span.finish({"extsvc.policy": "p"})


def sample(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value(
        "extsvc_tracing_spans_exported_total", {"result": result}
    ) or 0.0


async def test_exported_spans_are_counted() -> None:
    metrics = Metrics()
    with OtlpCollector() as collector:
        tracing = Tracing(collector.endpoint, metrics=metrics)
        _three_spans(tracing)
        assert tracing.flush()
        await tracing.stop()
        assert len(collector.spans) == 3
    assert (sample(metrics, "ok"), sample(metrics, "failed")) == (3, 0)


async def test_a_collector_that_is_down_fails_batches_counted_and_stops_in_bounds() -> None:
    metrics = Metrics()
    tracing = Tracing(f"http://127.0.0.1:{free_port()}", metrics=metrics, export_timeout_s=1.0)
    started = time.monotonic()
    for _ in range(20):
        _three_spans(tracing)
    assert time.monotonic() - started < 0.5  # the calls never wait for the collector
    tracing.flush(timeout_s=5.0)
    stopping = time.monotonic()
    await tracing.stop()
    assert time.monotonic() - stopping < 4.0  # STOP_TIMEOUT_S bounds it
    assert sample(metrics, "failed") == 60 and sample(metrics, "ok") == 0


async def test_the_ratio_decides_only_for_calls_without_a_caller_context() -> None:
    parent = "00-" + "1" * 32 + "-" + "2" * 16
    never, always = (Tracing(f"http://127.0.0.1:{free_port()}", sample_ratio=r, export_timeout_s=0.5)
                     for r in (0.0, 1.0))
    assert never.begin("svc", "M", _Call()) is None
    assert never.begin("svc", "M", _Call(("traceparent", f"{parent}-00"))) is None
    sampled = never.begin("svc", "M", _Call(("traceparent", f"{parent}-01")))
    assert sampled is not None and sampled.trace_id == "1" * 32
    root = always.begin("svc", "M", _Call())
    assert root is not None and root.trace_id != "1" * 32
    for tracing in (never, always):
        await tracing.stop()
