"""Running a floor (a bare grpc.aio servicer) until SIGTERM/SIGINT.

Kept apart from benchkit so a floor process imports nothing of extsvc: it stays a bare grpc.aio
server with the generated registration, exactly what the benchmarks compare against.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grpc

#: the floor's event loop, set by the benchmark driver (``--floor-loop``)
FLOOR_LOOP_ENV = "EXTSVC_BENCH_FLOOR_LOOP"


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

    # The bench's --floor-loop (benchkit.apply_loops): asyncio's own loop unless uvloop is asked.
    if os.environ.get(FLOOR_LOOP_ENV, "asyncio") == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())
