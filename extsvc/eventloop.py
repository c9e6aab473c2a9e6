"""Which asyncio event loop ``extsvc serve`` runs on (setting ``event_loop``).

``auto`` (the default) takes uvloop when it is installed -- it is a dependency on Linux and
macOS -- and asyncio's own loop otherwise. On this server's request path every gRPC message is
a few event-loop callbacks (grpc.aio hands each completion to the loop through a socket), so the
loop's own cost per callback counts: docs/performance.md has the measured difference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(the loop's name, a factory for ``asyncio.Runner``; None = asyncio's default).

    :raises ValueError: ``uvloop`` asked for and not installed.
    """
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("event_loop: uvloop is not installed (pip install uvloop)") from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def run(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run ``main`` to completion on the chosen loop."""
    _, factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: what the running loop is."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
