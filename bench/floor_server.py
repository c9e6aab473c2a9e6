"""The baseline: a bare grpc.aio Authorization servicer that answers OK to everything.

Run: python bench/floor_server.py PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


class Floor(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):
        return _OK


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
