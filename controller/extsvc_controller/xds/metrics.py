"""Prometheus metrics of the ADS server, registered on a registry the caller owns.

Why an explicit registry: the controller and its tests run several servers in one process; the
global registry would refuse the second set of names. Why these labels only: every label value is
from a fixed set (api, type short name, reason), never from a request, so an Envoy (or anything
else that connects) cannot grow the number of series.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["IGNORED_REASONS", "UNKNOWN_NODE_REASONS", "XdsMetrics"]

# Why a request was ignored: a stale nonce (superseded by a newer response), a type URL this server
# does not serve, or more names than the per-type cap.
IGNORED_REASONS = ("stale", "unknown_type", "too_many_names")
# Why a node got nothing: it maps to no group, or its group has no snapshot yet.
UNKNOWN_NODE_REASONS = ("no_group", "no_snapshot")


@dataclass(frozen=True)
class XdsMetrics:
    """The server's series; label ``api`` is ``sotw``/``delta``, ``type`` is ``cds``...``sds``."""

    streams: Gauge
    refused_streams: Counter
    responses: Counter
    acks: Counter
    nacks: Counter
    ignored: Counter
    unknown_nodes: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, prefix: str = "extsvc_controller_xds") -> XdsMetrics:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"{prefix}_{name}", doc, labels, registry=registry)

        return cls(
            streams=Gauge(
                f"{prefix}_streams", "ADS streams open now", ("api",), registry=registry
            ),
            refused_streams=counter(
                "refused_streams", "ADS streams refused because the concurrent-stream cap was reached"
            ),
            responses=counter("responses", "Discovery responses sent", "type"),
            acks=counter("acks", "Responses Envoy accepted (ACK)", "type"),
            nacks=counter("nacks", "Responses Envoy rejected (NACK, error_detail set)", "type"),
            ignored=counter(
                "ignored_requests",
                "Requests ignored: stale nonce, unknown type URL or too many names",
                "reason",
            ),
            unknown_nodes=counter(
                "unknown_nodes",
                "Streams whose node maps to no group, or to a group without a snapshot (once each)",
                "reason",
            ),
        )
