"""Every metric extsvc exports is defined here.

Each :class:`Metrics` owns its registry, so several servers can live in one test process. With
``--workers N`` the processes share ``PROMETHEUS_MULTIPROC_DIR`` and any worker's ``/metrics``
shows the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

# The *_created series double every counter for no use here; dashboards use rates.
disable_created_metrics()  # type: ignore[no-untyped-call]

_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self._plugin_counters: dict[str, Counter] = {}
        self._plugin_histograms: dict[str, Histogram] = {}

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

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (all workers' when multi-process)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
