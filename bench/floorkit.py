"""Running a floor (a bare grpc.aio servicer) until SIGTERM/SIGINT.

Kept apart from benchkit so a floor process imports nothing of extsvc: it stays a bare grpc.aio
server with the generated registration, exactly what the benchmarks compare against.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grpc


def serve_floor(
    add_servicer: Callable[[Any], None], port: int, options: Sequence[tuple[str, Any]] = ()
) -> None:
    """Serve on 127.0.0.1:``port``; ``add_servicer(server)`` registers the floor's servicer."""

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *options])
        add_servicer(server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())
