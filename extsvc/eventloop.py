"""Which asyncio event loop ``extsvc serve`` runs on (setting ``event_loop``).

``auto`` (the default) takes uvloop when it is installed -- it is a dependency on Linux and
macOS -- and asyncio's own loop otherwise. On this server's request path every gRPC message is
a few event-loop callbacks (grpc.aio hands each completion to the loop through a socket), so the
loop's own cost per callback counts: docs/performance.md has the measured difference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
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


def run(
    main: Coroutine[Any, Any, None],
    choice: str,
    *,
    cleanup_timeout_s: float | None = None,
    on_abandoned: Callable[[list[str], bool], None] | None = None,
) -> None:
    """Run ``main`` to completion on the chosen loop.

    Without ``cleanup_timeout_s``, as ``asyncio.run``: the tasks ``main`` leaves behind are
    cancelled and *waited for*, however long they take. With it, they (and the default thread
    pool) get that many seconds; whatever is still running then is handed to
    ``on_abandoned(descriptions, main_failed)`` -- ``extsvc serve`` logs it and exits with
    ``os._exit``, as the interpreter would otherwise wait for those at exit. A task that
    swallows its cancellation cannot keep the process alive that way.
    """
    _, factory = loop_factory(choice)
    if cleanup_timeout_s is None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main)
        return
    runner = asyncio.Runner(loop_factory=factory)
    # Our own default thread pool (asyncio.to_thread), so that its threads can be waited for
    # with a timeout: uvloop keeps its own out of reach.
    executor = ThreadPoolExecutor(thread_name_prefix="extsvc-thread")
    runner.get_loop().set_default_executor(executor)
    failed = True
    try:
        runner.run(main)
        failed = False
    finally:
        left = _finish(runner.get_loop(), executor, cleanup_timeout_s)
        if left and on_abandoned is not None:
            on_abandoned(left, failed)
        if not left:
            runner.close()


def _finish(loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, timeout: float) -> list[str]:
    """Cancel the loop's tasks and stop its thread pool, for at most ``timeout`` seconds; what
    is still running then, described."""
    deadline = time.monotonic() + timeout
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    left: list[str] = []
    if tasks:
        done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                loop.call_exception_handler({
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                })
        left.extend(f"task {_describe(task)}" for task in pending)
    executor.shutdown(wait=False, cancel_futures=True)
    for thread in list(executor._threads):
        thread.join(max(0.1, deadline - time.monotonic()))  # an idle one ends at once
        if thread.is_alive():
            left.append(f"thread {thread.name} (asyncio.to_thread work)")
    return left


def _describe(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None)
    where = f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})" if code else repr(coro)
    return f"{task.get_name()}: {where}"


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: what the running loop is."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
