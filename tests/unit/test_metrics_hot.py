"""Request-path metric children: the same exposition as prometheus_client's own, read at any time."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from extsvc.observability.metrics import HotCounter, HotHistogram, Metrics

# Values on, just under and just over bucket bounds, zero, and beyond the last bound (+Inf).
VALUES = [0.0, 0.0001, 0.00010001, 0.0005, 0.002, 0.0025, 0.09, 0.1, 0.3, 1.0, 7.5, 0.0001]


def _pair(metrics: Metrics) -> tuple[CollectorRegistry, Histogram, Counter]:
    """A plain registry with twins of two of extsvc's metrics, counted the usual way."""
    plain = CollectorRegistry()
    histogram = Histogram(
        "extsvc_step_duration_seconds", "Time spent in one policy step", ["policy", "plugin"],
        buckets=metrics.step_duration._upper_bounds[:-1], registry=plain,
    )
    counter = Counter(
        "extsvc_authz_decisions_total",
        "ext_authz answers by policy and decision (allow, deny, error)",
        ["policy", "decision"], registry=plain,
    )
    return plain, histogram, counter


def _series(text: bytes, *prefixes: str) -> list[str]:
    return sorted(
        line for line in text.decode().splitlines() if line.startswith(prefixes)
    )


def test_hot_children_expose_exactly_what_direct_counting_exposes() -> None:
    metrics = Metrics()
    plain, histogram, counter = _pair(metrics)
    hot_duration = metrics.hot(metrics.step_duration.labels("p", "jwt"))
    hot_allow = metrics.hot(metrics.authz_decisions.labels("p", "allow"))
    assert isinstance(hot_duration, HotHistogram)
    assert isinstance(hot_allow, HotCounter)
    for value in VALUES:
        hot_duration.observe(value)
        histogram.labels("p", "jwt").observe(value)
        hot_allow.inc()
        counter.labels("p", "allow").inc()
    hot_allow.inc(2.5)
    counter.labels("p", "allow").inc(2.5)

    names = ("extsvc_step_duration_seconds", "extsvc_authz_decisions_total")
    assert len(_series(generate_latest(plain), *names)) == 16  # 13 buckets, count, sum, counter
    assert _series(metrics.exposition(), *names) == _series(generate_latest(plain), *names)
    # A second scrape with nothing new in between changes nothing (pending sums were moved once).
    assert _series(metrics.exposition(), *names) == _series(generate_latest(plain), *names)


def test_any_collection_of_the_registry_sees_pending_counts() -> None:
    metrics = Metrics()
    hot = metrics.hot(metrics.authz_decisions.labels("p", "deny"))
    hot.inc()
    hot.inc()
    labels = {"policy": "p", "decision": "deny"}
    assert metrics.registry.get_sample_value("extsvc_authz_decisions_total", labels) == 2
    hot.inc()
    assert metrics.registry.get_sample_value("extsvc_authz_decisions_total", labels) == 3


def test_one_twin_per_child() -> None:
    metrics = Metrics()
    child = metrics.rl_hits.labels("d", "l")
    assert metrics.hot(child) is metrics.hot(metrics.rl_hits.labels("d", "l"))
    assert metrics.hot(child) is not metrics.hot(metrics.rl_hits.labels("d", "other"))


def test_negative_increments_fail_at_the_call_not_at_the_scrape() -> None:
    metrics = Metrics()
    hot = metrics.hot(metrics.authz_decisions.labels("p", "allow"))
    with pytest.raises(ValueError, match="non-negative"):
        hot.inc(-1)
    metrics.exposition()  # still renders


def test_a_histogram_layout_it_does_not_know_is_observed_directly() -> None:
    metrics = Metrics()

    class Foreign:  # a child without prometheus_client's private layout
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    foreign = Foreign()
    assert metrics.hot(foreign) is foreign


async def test_the_flusher_moves_counts_on_its_own_and_once_more_when_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Metrics, "FLUSH_INTERVAL_S", 0.01)
    metrics = Metrics()
    child = metrics.rl_responses.labels("ok")
    hot = metrics.hot(child)
    task = asyncio.get_running_loop().create_task(metrics.run_flusher())
    hot.inc(3)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if child._value.get() == 3:  # the prometheus child itself, without a collection
            break
    assert child._value.get() == 3
    hot.inc(4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert child._value.get() == 7


def test_a_hot_gauge_goes_up_and_down_and_reads_right_at_any_collection() -> None:
    metrics = Metrics()
    active = metrics.hot(metrics.extproc_active_streams)
    read = lambda: metrics.registry.get_sample_value("extsvc_extproc_active_streams")  # noqa: E731
    assert read() == 0
    active.inc()
    active.inc()
    assert read() == 2
    active.dec()
    assert read() == 1
    active.dec()
    assert read() == 0


async def test_a_scrape_renders_off_the_loop_and_flushes_only_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """exposition_async: the hot children (loop-thread only) are flushed on the loop; the
    render thread collects without touching them, so no increment is lost to a race."""
    import threading

    metrics = Metrics()
    hot = metrics.hot(metrics.rl_responses.labels("ok"))
    hot.inc(3)
    flushed_in: list[int] = []
    rendered_in: list[int] = []
    flush, render = Metrics.flush, Metrics._render_off_loop

    def spy_flush(self: Metrics) -> None:
        flushed_in.append(threading.get_ident())
        flush(self)

    def spy_render(self: Metrics) -> bytes:
        rendered_in.append(threading.get_ident())
        return render(self)

    monkeypatch.setattr(Metrics, "flush", spy_flush)
    monkeypatch.setattr(Metrics, "_render_off_loop", spy_render)
    text = await metrics.exposition_async()
    assert b'extsvc_ratelimit_responses_total{code="ok"} 3.0' in text
    assert set(flushed_in) == {threading.get_ident()}
    assert rendered_in and rendered_in[0] != threading.get_ident()
    # the same text as rendered on the loop (but for the process collector's CPU time and
    # memory, which move between two renders on a busy machine)

    def stable(rendered: bytes) -> list[bytes]:
        return [line for line in rendered.splitlines() if b"process_" not in line]

    assert stable(metrics.exposition()) == stable(text)
