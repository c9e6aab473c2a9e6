"""The compiled config serving requests, and the holder that swaps it atomically.

A swap is one attribute assignment on the event loop, so a request sees either the old or the new
runtime, never a mix. A retired runtime is closed once the requests that started on it are done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from extsvc.config.model import POLICY_CONTEXT_KEY, ExtsvcConfig
from extsvc.selection import by_authority

if TYPE_CHECKING:
    from extsvc.authz.pipeline import CompiledPolicy
    from extsvc.extproc.pipeline import ExtprocPolicies
    from extsvc.observability.metrics import Metrics
    from extsvc.plugin.protocols import Authorizer

log = logging.getLogger(__name__)

#: seconds one plugin's ``aclose()`` may take before it is abandoned (logged)
CLOSE_TIMEOUT_S = 5.0
#: closing many plugins hands the event loop a turn at least this often (seconds)
YIELD_EVERY_S = 0.01


@dataclass(eq=False)
class Runtime:
    config: ExtsvcConfig
    policies: Mapping[str, CompiledPolicy]
    authorizers: tuple[Authorizer, ...]
    generation: int
    metrics: Metrics
    extproc: ExtprocPolicies | None = None
    inflight: int = 0
    retired: bool = False
    closed: bool = False
    _closing: asyncio.Task[None] | None = field(default=None, repr=False)
    #: whether the call's authority can pick a policy other than the default (see select())
    authority_matters: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        default = self.config.default_policy
        self.authority_matters = any(name != default for name in self.policies) or any(
            name != default for name in self.config.authority_policies.values()
        )

    def select(
        self, context_extensions: Mapping[str, str], authority: str | Callable[[], str]
    ) -> tuple[str, CompiledPolicy | None]:
        """Pick the policy for a request: context_extensions, then :authority, then the default.

        ``authority`` may be a callable, called only when context_extensions name no policy.
        Returns the chosen name (for logs and metrics) and the policy, ``None`` if unknown.
        """
        name = context_extensions.get(POLICY_CONTEXT_KEY)
        host = "" if name else authority if isinstance(authority, str) else authority()
        if host:
            name = by_authority(host, self.config.authority_policies, self.policies)
        if not name:
            name = self.config.default_policy or ""
        return name, self.policies.get(name)

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self._schedule_close()

    def retire(self) -> None:
        self.retired = True
        if self.inflight == 0:
            self._schedule_close()

    def _schedule_close(self) -> None:
        if self._closing is None and not self.closed:
            self._closing = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.close_plugins(self.authorizers)
        if self.extproc is not None:
            await self.close_plugins(self.extproc.processors)

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await self._closing

    @staticmethod
    async def close_plugins(built: Iterable[object]) -> None:
        """``aclose()`` each plugin object (authorizers, processors: those that have one), each
        for at most CLOSE_TIMEOUT_S.

        A plugin that fails or hangs is logged and the next one is closed regardless; the event
        loop gets a turn every YIELD_EVERY_S, so retiring a big config does not stall it.
        """
        turn = time.perf_counter()
        for plugin in built:
            aclose = getattr(plugin, "aclose", None)  # Closable, without typing's isinstance
            if aclose is not None:
                await _close_one(aclose, type(plugin).__name__)
            if time.perf_counter() - turn >= YIELD_EVERY_S:
                await asyncio.sleep(0)
                turn = time.perf_counter()


async def _close_one(aclose: Callable[[], Awaitable[object]], name: str) -> None:
    try:
        task = asyncio.ensure_future(aclose())
    except Exception:  # one plugin failing to close must not leak the others
        log.exception("closing %s failed", name)
        return
    try:
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        log.error("closing %s: aclose() took over %g s; abandoned", name, CLOSE_TIMEOUT_S)
        return
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        log.error("closing %s failed", name, exc_info=error)


def _retrieve(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()


class RuntimeHolder:
    """Holds the runtime serving now; ``None`` until the first good load."""

    def __init__(self) -> None:
        self.current: Runtime | None = None

    def swap(self, runtime: Runtime) -> Runtime | None:
        old, self.current = self.current, runtime
        if old is not None:
            old.retire()
        return old

    async def close(self) -> None:
        runtime, self.current = self.current, None
        if runtime is not None:
            runtime.retire()
            await runtime.wait_closed()
