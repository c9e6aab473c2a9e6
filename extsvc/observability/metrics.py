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
        self.extproc_streams = Counter(
            "extsvc_extproc_streams_total",
            "ext_proc streams by policy and outcome (ok, immediate, unknown-policy, "
            "protocol-error, not-ready, reset, cancelled)",
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
        # Rate limiting, in the spirit of envoyproxy/ratelimit's stats. `limit` is the limit's
        # name, else its descriptor path in the domain file (request values only with
        # detailed_metric), so the label set is bounded by the config.
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
