"""The baseline: a bare grpc.aio Authorization servicer that answers OK to everything.

Run: python bench/floor_server.py PORT
"""

from __future__ import annotations

import sys

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from floorkit import serve_floor
from google.rpc import status_pb2

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


class Floor(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):
        return _OK


if __name__ == "__main__":
    serve_floor(
        lambda server: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server),
        int(sys.argv[1]),
    )
