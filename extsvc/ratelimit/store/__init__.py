"""Counter stores: one async call per request applies every descriptor's operation.

A store implements :class:`LimitStore`. ``apply`` gets the operations of one request (see
:class:`extsvc.ratelimit.algorithms.Op`) and returns one ``(x, y)`` integer pair per operation:
``(count after, 0)`` for ``f``, ``(admitted, usage)`` for ``s``, ``(admitted, tat)`` for ``g``.
It raises :class:`extsvc.errors.StoreError` when it cannot answer.

Built in: :mod:`.memory` and :mod:`.redis`. Plugins provide others through the hook
``extsvc_register_limit_stores`` (:mod:`.plugin` builds them), with the same Protocol.

Optional capabilities are Protocols too, which the limiter checks once when it is built (never
per request): :class:`ImmediateStore` (answers without waiting: called without a coroutine, and
not bounded by the RPC's deadline) and :class:`DeadlineStore` (bounds its own call by a deadline).
A store with neither is remote: its ``apply`` is bounded by the RPC's deadline by the limiter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from extsvc.ratelimit.algorithms import Op


@runtime_checkable
class LimitStore(Protocol):
    #: label for metrics and logs: ``memory``, ``redis``, ``redis-cluster`` (a plugin's store is
    #: labelled with the name it is registered under)
    kind: str

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        """Apply ``ops`` atomically per key; one round trip to a remote store."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ImmediateStore(Protocol):
    """A store in this process: ``apply_now`` is ``apply`` without a coroutine (nothing waits)."""

    def apply_now(self, ops: Sequence[Op]) -> list[tuple[int, int]]: ...


@runtime_checkable
class DeadlineStore(Protocol):
    """A remote store that bounds its call itself: ``apply_by`` fails with StoreError at
    ``deadline`` (event-loop time, None: no deadline) at the latest, so no timer is armed."""

    async def apply_by(self, ops: Sequence[Op], deadline: float | None) -> list[tuple[int, int]]: ...
