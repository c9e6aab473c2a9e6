"""Counter stores: one async call per request applies every descriptor's operation.

A store implements :class:`LimitStore`. ``apply`` gets the operations of one request (see
:class:`extsvc.ratelimit.algorithms.Op`) and returns one ``(x, y)`` integer pair per operation:
``(count after, 0)`` for ``f``, ``(admitted, usage)`` for ``s``, ``(admitted, tat)`` for ``g``.
It raises :class:`extsvc.errors.StoreError` when it cannot answer.

Built in: :mod:`.memory` and :mod:`.redis`. Plugins provide others through the hook
``extsvc_register_limit_stores`` (:mod:`.plugin` builds them), with the same Protocol.
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
