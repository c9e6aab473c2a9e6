"""Every metric extsvc exports is defined here.

Each :class:`Metrics` owns its registry, so several servers can live in one test process. With
``--workers N`` the processes share ``PROMETHEUS_MULTIPROC_DIR`` and any worker's ``/metrics``
shows the sum over all of them.

The request path counts through :meth:`Metrics.hot` children: ``inc()``/``observe()`` add to plain
Python numbers (no lock, no per-call checks), and the sums reach prometheus_client whenever the
registry is collected (every scrape, every read) and at least once a second (:meth:`Metrics.run_flusher`,
so other workers see them in multi-process mode). prometheus_client's own ``inc()`` is a lock and
three calls; with four or five counters per request that was ~10% of extsvc's CPU per Check.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


def _version() -> str:
    try:
        return importlib.metadata.version("extsvc")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


# The *_created series double every counter for no use here; dashboards use rates.
disable_created_metrics()  # type: ignore[no-untyped-call]

_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: whole calls: the step buckets, plus the range of a slow dependency up to Envoy's timeouts
_CALL_BUCKETS = (*_STEP_BUCKETS, 2.5, 5.0)


class HotCounter:
    """A counter child for the request path: ``inc()`` adds to a plain number; :meth:`flush`
    hands the sum to the prometheus child. Only the event-loop thread may use it."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self._pending: float = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as prometheus_client does, but here, not at the next flush
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            amount, self._pending = self._pending, 0
            self._child.inc(amount)


class HotGauge:
    """A gauge for the request path (``inc()``/``dec()`` on a plain number); :meth:`flush` sets
    the child to it (so multi-process ``livesum`` gauges keep working)."""

    __slots__ = ("_child", "_flushed", "_value")

    def __init__(self, child: Gauge) -> None:
        self._child = child
        self._value: float = 0
        self._flushed: float = 0

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value -= amount

    def flush(self) -> None:
        if self._value != self._flushed:
            self._flushed = self._value
            self._child.set(self._value)


class HotHistogram:
    """A histogram child for the request path: ``observe()`` counts into a local bucket array
    (the same ``value <= bound`` rule as prometheus_client); :meth:`flush` adds the counts to the
    child's buckets and sum."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._sum += amount
        self._counts[bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        child = self._child
        child._sum.inc(total)
        for bucket, count in zip(child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


def _can_defer(child: Histogram) -> bool:
    """HotHistogram relies on prometheus_client's child layout (``_upper_bounds``, ``_sum``,
    ``_buckets``), stable since 0.4; if a release changes it, observe directly instead."""
    return all(hasattr(child, name) for name in ("_upper_bounds", "_sum", "_buckets"))


#: Set in the thread rendering a scrape (:meth:`Metrics.exposition_async`): the hot children
#: belong to the event-loop thread, which flushed them before handing the render over.
_off_loop = threading.local()


class _FlushFirst(Collector):
    """Registered before every metric, so each collection of the registry (a scrape,
    ``get_sample_value``) first moves the hot children's sums into prometheus_client."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        if not getattr(_off_loop, "active", False):
            self._metrics.flush()
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())


#: The ``limit`` label value that stands for every request-derived value past the cap.
OTHER_LABEL = "(other)"


class ChildCache:
    """Request-path children of one labelled metric, by a key, made on first use by ``make``.

    For label values that come from the config (policy names, domains): at most ``max_entries``
    are remembered, so even a bug that passed request values could not grow it without bound
    (past it, children are still made, just not kept).
    """

    __slots__ = ("_children", "_make", "_max")

    def __init__(self, make: Callable[[str], Any], max_entries: int = 1024) -> None:
        self._make = make
        self._max = max_entries
        self._children: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._make(key)
            if len(self._children) < self._max:
                self._children[key] = child
        return child


class Metrics:
    #: seconds between flushes of the hot children by :meth:`run_flusher`
    FLUSH_INTERVAL_S = 1.0

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_open_fds / process_max_fds, process_resident_memory_bytes, CPU (Linux /proc);
        # python_info and python_gc_* (collections, objects collected, uncollectable)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge(
            "extsvc_build_info", "extsvc's version and Python's (always 1)",
            ["version", "python"], registry=r, multiprocess_mode="max",
        ).labels(_version(), platform.python_version()).set(1)
        self._hot: dict[int, tuple[Any, HotCounter | HotGauge | HotHistogram]] = {}
        #: rate-limit domain -> the request-derived ``limit`` label values admitted (see rl_label)
        self._rl_values: dict[str, set[str]] = {}
        self._render_lock: asyncio.Lock | None = None
        self._render_loop: asyncio.AbstractEventLoop | None = None
        r.register(_FlushFirst(self))
        self.authz_decisions = Counter(
            "extsvc_authz_decisions_total",
            "ext_authz answers by policy and decision (allow, deny, error)",
            ["policy", "decision"],
            registry=r,
        )
        self.step_duration = Histogram(
            "extsvc_step_duration_seconds",
            "Time spent in one policy step",
            ["policy", "plugin"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.step_errors = Counter(
            "extsvc_step_errors_total",
            "Steps that raised or overran the deadline",
            ["policy", "plugin", "reason"],
            registry=r,
        )
        self.unknown_policy = Counter(
            "extsvc_authz_unknown_policy_total",
            "Check requests that named no known policy (denied)",
            ["policy"],
            registry=r,
        )
        self.bad_requests = Counter(
            "extsvc_authz_bad_requests_total",
            "Check requests that could not be read (denied)",
            registry=r,
        )
        self.request_rejected = Counter(
            "extsvc_request_rejected_total",
            "Requests over a cap of what one may carry (docs/hardening.md), by service (authz, "
            "extproc) and reason (header-count, header-bytes, body-bytes)",
            ["service", "reason"],
            registry=r,
        )
        self.config_reloads = Counter(
            "extsvc_config_reloads_total",
            "Config loads by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.config_generation = Gauge(
            "extsvc_config_generation",
            "Generation number of the config serving now (0 = none loaded)",
            registry=r,
            multiprocess_mode="max",
        )
        self.config_last_success = Gauge(
            "extsvc_config_last_success_timestamp_seconds",
            "Unix time of the last good config load",
            registry=r,
            multiprocess_mode="max",
        )
        self.extproc_streams = Counter(
            "extsvc_extproc_streams_total",
            "ext_proc streams by policy and outcome (ok, immediate, unknown-policy, unselected, "
            "protocol-error, not-ready, incomplete, cancelled)",
            ["policy", "outcome"],
            registry=r,
        )
        self.extproc_messages = Counter(
            "extsvc_extproc_messages_total",
            "ext_proc messages by policy and direction (received from / sent to Envoy)",
            ["policy", "direction"],
            registry=r,
        )
        self.extproc_mode_overrides = Counter(
            "extsvc_extproc_mode_overrides_total",
            "ext_proc streams answered with a mode_override switching phases off",
            ["policy"],
            registry=r,
        )
        self.extproc_processor_duration = Histogram(
            "extsvc_extproc_processor_duration_seconds",
            "Time spent in one ext_proc processor on one message",
            ["policy", "processor"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.extproc_processor_errors = Counter(
            "extsvc_extproc_processor_errors_total",
            "ext_proc processors that raised or overran timeout_ms (answered per on_error)",
            ["policy", "processor", "reason"],
            registry=r,
        )
        self.extproc_active_streams = Gauge(
            "extsvc_extproc_active_streams",
            "ext_proc streams open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.answer_lateness = Histogram(
            "extsvc_answer_lateness_seconds",
            "ext_authz answers per on_error after a failed step: how long after the step deadline "
            "(the RPC's, minus the margin) the answer was ready; near the margin means answers "
            "are about to miss the caller's deadline (raise deadline_margin_ms)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.shed = Counter(
            "extsvc_shed_total",
            "RPCs refused at once because too many were in progress, by service (ext_proc: "
            "RESOURCE_EXHAUSTED past max_extproc_streams; ext_authz: the policy's on_error "
            "answer past max_authz_inflight)",
            ["service"],
            registry=r,
        )
        # Rate limiting, in the spirit of envoyproxy/ratelimit's stats. `limit` is the limit's
        # name, else its descriptor path in the domain file. Values taken from requests
        # (detailed_metric, value_to_metric, the keys of Envoy's limit overrides) are capped per
        # domain by rl_label: past the cap they are counted under "(other)".
        rl_labels = ["domain", "limit"]
        self.rl_hits = Counter(
            "extsvc_ratelimit_hits_total", "Hits checked against a limit (total_hits)",
            rl_labels, registry=r,
        )
        self.rl_over_limit = Counter(
            "extsvc_ratelimit_over_limit_total", "Hits over the limit", rl_labels, registry=r
        )
        self.rl_near_limit = Counter(
            "extsvc_ratelimit_near_limit_total",
            "Hits within the limit but above near_limit_ratio of it", rl_labels, registry=r,
        )
        self.rl_within_limit = Counter(
            "extsvc_ratelimit_within_limit_total", "Hits within the limit", rl_labels, registry=r
        )
        self.rl_shadow_mode = Counter(
            "extsvc_ratelimit_shadow_mode_total",
            "Hits over a shadow_mode limit (answered OK)", rl_labels, registry=r,
        )
        self.rl_over_limit_local_cache = Counter(
            "extsvc_ratelimit_over_limit_local_cache_total",
            "Over-limit hits answered from the local cache, without the store", rl_labels,
            registry=r,
        )
        self.rl_global_shadow_mode = Counter(
            "extsvc_ratelimit_global_shadow_mode_total",
            "OVER_LIMIT answers turned into OK by the section's shadow_mode", registry=r,
        )
        self.rl_responses = Counter(
            "extsvc_ratelimit_responses_total",
            "ShouldRateLimit answers by overall code (ok, over_limit, error)", ["code"],
            registry=r,
        )
        self.rl_unknown_domain = Counter(
            "extsvc_ratelimit_unknown_domain_total",
            "Requests for a domain no domain file defines (answered per unknown_domain)",
            registry=r,
        )
        self.rl_store_errors = Counter(
            "extsvc_ratelimit_store_errors_total",
            "Store calls that failed or overran the deadline, by store and the answer given "
            "(failure_mode)", ["store", "answer"], registry=r,
        )
        self.rl_store_duration = Histogram(
            "extsvc_ratelimit_store_duration_seconds", "Time of one store call (one per RPC)",
            ["store"], buckets=_STEP_BUCKETS, registry=r,
        )
        self.rl_domain_loads = Counter(
            "extsvc_ratelimit_domain_loads_total",
            "Domain file loads by result (ok, error); an error keeps that file's last good "
            "version", ["result"], registry=r,
        )
        self.rl_domains = Gauge(
            "extsvc_ratelimit_domains", "Rate-limit domains serving now", registry=r,
            multiprocess_mode="max",
        )
        self.admin_errors = Counter(
            "extsvc_admin_errors_total",
            "Admin listener connections refused or cut short, by reason (too-large, bad-request, "
            "timeout, overloaded, accept)", ["reason"], registry=r,
        )
        # The whole call, per service: what Envoy waits for. `policy` is a configured policy
        # name (ext_authz, ext_proc) or rate-limit domain, "" for none chosen and
        # UNKNOWN_POLICY_LABEL for any name a request gave that the config lacks.
        self.request_duration = Histogram(
            "extsvc_request_duration_seconds",
            "Time from a request's arrival to its answer: a Check, a ShouldRateLimit, or one "
            "ext_proc message (a stream lives as long as its HTTP request), by service "
            "(ext_authz, ext_proc, ratelimit) and policy (rate limiting: domain)",
            ["service", "policy"], buckets=_CALL_BUCKETS, registry=r,
        )
        self.grpc_handled = Counter(
            "extsvc_grpc_handled_total",
            "RPCs ended, by service (ext_authz, ext_proc, ratelimit), method and gRPC "
            "status code name (OK, INVALID_ARGUMENT, UNAVAILABLE, RESOURCE_EXHAUSTED, "
            "CANCELLED, ...); ext_authz denials are OK calls (the denial is in the answer)",
            ["service", "method", "code"], registry=r,
        )
        # The decision log (docs/observability.md): records by sink, and what was left out.
        self.decision_records = Counter(
            "extsvc_decision_log_records_total",
            "Decision records written, by sink (stdout, stream: one per reader it reached)",
            ["sink"], registry=r,
        )
        self.decision_dropped = Counter(
            "extsvc_decision_log_dropped_total",
            "Decision records left out, by sink and reason (rate: over "
            "decision_log_max_per_second; slow-reader: a stream reader's queue was full; "
            "backlog: stdout could not keep up)",
            ["sink", "reason"], registry=r,
        )
        self.spans_exported = Counter(
            "extsvc_tracing_spans_exported_total",
            "Spans handed to the OTLP collector, by result (ok, failed: the collector was "
            "unreachable or refused the batch after the exporter's retries)",
            ["result"], registry=r,
        )
        self.decision_readers = Gauge(
            "extsvc_decision_stream_readers",
            "Live decision stream readers attached (extsvc tail / top)",
            registry=r, multiprocess_mode="livesum",
        )
        self._plugin_counters: dict[str, Counter] = {}
        self._plugin_histograms: dict[str, Histogram] = {}

    def rl_label(self, domain: str, label: str, cap: int) -> str:
        """``label`` if ``domain`` has fewer than ``cap`` request-derived ``limit`` values
        registered (or has this one), else :data:`OTHER_LABEL`. Kept here, with the registry,
        so that rebuilding the limiter (a config reload) cannot add another ``cap`` series."""
        seen = self._rl_values.get(domain)
        if seen is None:
            seen = self._rl_values[domain] = set()
        if label in seen:
            return label
        if len(seen) >= cap:
            return OTHER_LABEL
        seen.add(label)
        return label

    def plugin_counter(self, name: str, documentation: str) -> Counter:
        counter = self._plugin_counters.get(name)
        if counter is None:
            counter = Counter(
                f"extsvc_plugin_{name}_total", documentation, ["plugin", "policy"],
                registry=self.registry,
            )
            self._plugin_counters[name] = counter
        return counter

    def plugin_histogram(self, name: str, documentation: str) -> Histogram:
        histogram = self._plugin_histograms.get(name)
        if histogram is None:
            histogram = Histogram(
                f"extsvc_plugin_{name}_seconds", documentation, ["plugin", "policy"],
                buckets=_STEP_BUCKETS, registry=self.registry,
            )
            self._plugin_histograms[name] = histogram
        return histogram

    def request_durations(self, service: str) -> ChildCache:
        """``extsvc_request_duration_seconds`` children of ``service``, by policy (or domain)."""
        return ChildCache(lambda policy: self.hot(self.request_duration.labels(service, policy)))

    def hot(self, child: Any) -> Any:
        """The request-path twin of a labelled Counter, Gauge or Histogram child (one per child)."""
        entry = self._hot.get(id(child))
        if entry is None:
            if isinstance(child, Counter):
                twin: HotCounter | HotGauge | HotHistogram = HotCounter(child)
            elif isinstance(child, Gauge):
                twin = HotGauge(child)
            elif isinstance(child, Histogram) and _can_defer(child):
                twin = HotHistogram(child)
            else:
                return child
            # The child is kept with its twin: an id is only unique while its object lives.
            entry = self._hot[id(child)] = (child, twin)
        return entry[1]

    def flush(self) -> None:
        """Move every hot child's pending counts into prometheus_client."""
        for _, twin in list(self._hot.values()):
            twin.flush()

    async def run_flusher(self) -> None:
        """Flush every :attr:`FLUSH_INTERVAL_S` until cancelled, and once more then."""
        try:
            while True:
                await asyncio.sleep(self.FLUSH_INTERVAL_S)
                self.flush()
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (all workers' when multi-process)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.flush()  # this worker's counts; the others flush on their own clock
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    async def exposition_async(self) -> bytes:
        """:meth:`exposition` without blocking the event loop: the hot children are flushed
        here, on the loop, and the text is rendered in a worker thread (prometheus_client's
        collection takes its own locks, so requests keep counting meanwhile). One render at a
        time: concurrent scrapes queue rather than each holding a copy of a large text."""
        loop = asyncio.get_running_loop()
        if self._render_lock is None or self._render_loop is not loop:
            self._render_lock, self._render_loop = asyncio.Lock(), loop
        async with self._render_lock:
            self.flush()
            return await asyncio.to_thread(self._render_off_loop)

    def _render_off_loop(self) -> bytes:
        _off_loop.active = True
        try:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                registry = CollectorRegistry()
                prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
                return generate_latest(registry)
            return generate_latest(self.registry)
        finally:
            _off_loop.active = False
