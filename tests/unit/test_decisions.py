"""The decision log: what it keeps, what it writes to stdout, and what it drops (counted)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from extsvc.observability.decisions import (
    MAX_FIELD,
    DecisionFilter,
    DecisionLog,
    DecisionRecord,
    format_time,
    route_path,
    trace_id_of,
)
from extsvc.observability.metrics import Metrics


def record(i: int = 0, *, at: float = 1_765_000_000.25, **fields: object) -> DecisionRecord:
    values: dict[str, object] = {
        "time": at, "service": "ext_authz", "policy": "p", "outcome": "deny", "status": 403,
        "path": f"/r/{i}", "request_id": f"r{i}",
    }
    values.update(fields)
    return DecisionRecord(**values)  # type: ignore[arg-type]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    metrics.flush()
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_times_are_utc_with_milliseconds() -> None:
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_time(1_765_000_000.2509) == "2025-12-06T05:46:40.250Z"


def test_paths_lose_their_query_and_fields_are_bounded() -> None:
    assert route_path("/a/b?access_token=s3cr3t") == "/a/b"
    long = route_path("/" + "x" * 5000)
    assert len(long) == MAX_FIELD and long.endswith("…")


@pytest.mark.parametrize(("headers", "trace"), [
    ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
     "0af7651916cd43dd8448eb211c80319c"),
    ({"x-b3-traceid": "463ac35c9f6413ad"}, "463ac35c9f6413ad"),
    ({"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"},
     "80f198ee56343ba864fe8b2a57d3eff7"),
    ({"traceparent": "garbage"}, ""),
    ({}, ""),
])
def test_the_trace_id_comes_from_w3c_or_b3_headers(headers: dict[str, str], trace: str) -> None:
    assert trace_id_of(headers.get) == trace


def test_filters_match_on_every_field() -> None:
    rec = record(path="/api/orders", authority="shop.test", policy="api", outcome="deny")
    assert DecisionFilter().matches(rec)
    assert DecisionFilter(services=frozenset({"ext_authz", "ratelimit"})).matches(rec)
    assert not DecisionFilter(services=frozenset({"ext_proc"})).matches(rec)
    assert DecisionFilter(policies=frozenset({"api"}), outcomes=frozenset({"deny"})).matches(rec)
    assert not DecisionFilter(outcomes=frozenset({"allow"})).matches(rec)
    assert DecisionFilter(authority="shop.test", path_prefix="/api/").matches(rec)
    assert not DecisionFilter(authority="other.test").matches(rec)
    assert not DecisionFilter(path_prefix="/admin").matches(rec)


async def test_stdout_gets_json_lines_capped_per_second_and_the_rest_is_counted() -> None:
    metrics = Metrics()
    out = io.BytesIO()
    log = DecisionLog(metrics, max_per_second=3, out=out)
    log.start()
    for i in range(5):
        log.record(record(i, at=100.1))
    for i in range(5, 7):
        log.record(record(i, at=101.1))  # a new second: room again
    await log.stop()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2", "r5", "r6"]
    assert lines[0] == {
        "time": "1970-01-01T00:01:40.100Z", "kind": "decision", "service": "ext_authz",
        "policy": "p", "outcome": "deny", "status": 403, "step": "", "reason": "",
        "latency_ms": 0.0, "request_id": "r0", "trace_id": "", "authority": "", "path": "/r/0",
        "method": "", "source": "", "worker": 0,
    }
    assert sample(metrics, "extsvc_decision_log_records_total", sink="stdout") == 5
    assert sample(metrics, "extsvc_decision_log_dropped_total", sink="stdout", reason="rate") == 2


async def test_sampling_writes_a_share_and_the_live_stream_still_sees_all() -> None:
    out = io.BytesIO()
    log = DecisionLog(Metrics(), sample=0.0, out=out)
    reader = log.attach(DecisionFilter())
    assert reader is not None
    log.start()
    for i in range(10):
        log.record(record(i))
    await log.stop()
    assert out.getvalue() == b""
    records, dropped = await reader.take()
    assert (len(records), dropped) == (10, 0)


async def test_a_stdout_that_is_not_read_drops_batches_instead_of_stalling() -> None:
    metrics = Metrics()

    class Stuck(io.RawIOBase):
        def __init__(self) -> None:
            self.gate = __import__("threading").Event()

        def write(self, data: object) -> int:
            self.gate.wait(5)
            return 0

    stuck = Stuck()
    log = DecisionLog(metrics, max_per_second=1_000_000, out=stuck)  # type: ignore[arg-type]
    log.start()
    for batch in range(60):  # more batches than the writer's queue holds
        for i in range(10):
            log.record(record(batch * 10 + i, at=float(batch)))
        log.flush()
    await asyncio.sleep(0)  # the loop was never blocked: we are here
    dropped = sample(metrics, "extsvc_decision_log_dropped_total", sink="stdout", reason="backlog")
    stuck.gate.set()
    await log.stop()
    assert dropped >= 90


async def test_a_slow_reader_loses_records_counted_and_told() -> None:
    metrics = Metrics()
    log = DecisionLog(metrics, reader_queue=3, stdout=False)
    reader = log.attach(DecisionFilter(outcomes=frozenset({"deny"})))
    assert reader is not None
    for i in range(5):
        log.record(record(i))
    log.record(record(99, outcome="allow"))  # filtered out: neither queued nor dropped
    records, dropped = await reader.take()
    assert ([r.request_id for r in records], dropped) == (["r0", "r1", "r2"], 2)
    assert sample(metrics, "extsvc_decision_log_dropped_total", sink="stream",
                  reason="slow-reader") == 2
    assert sample(metrics, "extsvc_decision_log_records_total", sink="stream") == 3


async def test_recent_decisions_are_kept_for_late_readers_and_readers_are_capped() -> None:
    metrics = Metrics()
    log = DecisionLog(metrics, recent=4, max_readers=1, stdout=False)
    for i in range(6):
        log.record(record(i, policy="a" if i % 2 else "b"))
    assert [r.request_id for r in log.recent(DecisionFilter(), 10)] == ["r2", "r3", "r4", "r5"]
    assert [r.request_id for r in log.recent(DecisionFilter(policies=frozenset({"a"})), 1)] == ["r5"]
    reader = log.attach(DecisionFilter(), recent=2)
    assert reader is not None
    assert log.attach(DecisionFilter()) is None  # max_readers
    assert sample(metrics, "extsvc_decision_stream_readers") == 1
    records, _ = await reader.take()
    assert [r.request_id for r in records] == ["r4", "r5"]
    log.detach(reader)
    assert sample(metrics, "extsvc_decision_stream_readers") == 0


def test_an_off_log_records_nothing_and_header_detail_is_redacted() -> None:
    assert not DecisionLog(Metrics(), level="off").active
    log = DecisionLog(Metrics(), headers=("Authorization", "x-tenant", "x-absent"), stdout=False)
    detail = log.header_detail({"authorization": "Bearer s3cr3t", "x-tenant": "acme"})
    assert detail == (("authorization", "<redacted>"), ("x-tenant", "acme"))


async def test_each_line_is_one_write_so_workers_sharing_a_pipe_never_interleave() -> None:
    class Writes(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[bytes] = []

        def write(self, data: object) -> int:
            assert isinstance(data, bytes)
            self.calls.append(data)
            return super().write(data)

    out = Writes()
    log = DecisionLog(Metrics(), out=out)
    log.start()
    for i in range(3):
        log.record(record(i, reason="x" * 300))
    await log.stop()
    assert len(out.calls) == 3
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 and len(c) < 4096 for c in out.calls)
