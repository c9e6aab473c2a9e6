"""Names on the wire between Envoy's config and the server, shared with extsvc-controller.

The bottom layer: no imports, so that anything (the controller included) may import it.
"""

from __future__ import annotations

#: gRPC metadata key carrying the authority when grpcio cannot expose ``:authority`` itself
#: (``GatewayExtension.grpcService.authority`` -> ``grpc_service.initial_metadata``).
AUTHORITY_METADATA_KEY = "x-extsvc-authority"
