"""extsvc-controller: kgateway's GatewayExtension/TrafficPolicy and Gateway API -> Envoy config.

``translate.translate`` is the pure core; ``sources`` read manifests into snapshots; ``render``
writes a static Envoy bootstrap and the statuses; ``cli`` is ``extsvc-controller``.
"""

from __future__ import annotations

__all__: list[str] = []
