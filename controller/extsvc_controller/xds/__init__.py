"""The controller's Aggregated Discovery Service: Envoy fetches its config over one gRPC stream.

``cache`` holds one content-addressed snapshot per Gateway (a *group*), ``server`` speaks ADS
(state of the world and delta) to every Envoy of that group, ``bootstrap`` writes the few lines an
Envoy needs to find the server, and ``metrics`` counts what happened. The translator produces the
resources; nothing here knows about Gateway API objects. The rules followed (answer the first
request of each type, ignore stale nonces, never answer a NACK by resending, push CDS -> EDS -> LDS
-> RDS -> SDS, never an accidental empty CDS/LDS) come from Envoy 1.40's observed ADS behaviour.
"""

from __future__ import annotations

from .bootstrap import XdsTls, ads_bootstrap
from .cache import (
    CDS,
    EDS,
    LDS,
    RDS,
    SDS,
    NodeStatus,
    SnapshotCache,
    XdsSnapshot,
    group_of,
)
from .metrics import XdsMetrics
from .server import AdsServicer, XdsServerSettings, serve_xds, server_options

__all__ = [
    "CDS",
    "EDS",
    "LDS",
    "RDS",
    "SDS",
    "AdsServicer",
    "NodeStatus",
    "SnapshotCache",
    "XdsMetrics",
    "XdsServerSettings",
    "XdsSnapshot",
    "XdsTls",
    "ads_bootstrap",
    "group_of",
    "serve_xds",
    "server_options",
]
