"""Readiness shared by gRPC health and the HTTP admin listener."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthState:
    """NOT_SERVING until the first good config load; NOT_SERVING again while draining."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.servicer = health.aio.HealthServicer()
        self._services = ("", *services)
        self.alive = True
        self.ready = False
        self.reason = "no config loaded yet"

    async def start(self) -> None:
        await self._publish(NOT_SERVING)

    async def mark_ready(self) -> None:
        self.ready = True
        self.reason = ""
        await self._publish(SERVING)

    async def mark_draining(self) -> None:
        self.ready = False
        self.reason = "shutting down"
        await self._publish(NOT_SERVING)

    async def _publish(self, status: int) -> None:
        for service in self._services:
            await self.servicer.set(service, status)
