"""Exponential backoff with full jitter, for every retry against the API server.

Full jitter (a uniform delay in ``[0, min(cap, base * 2**attempt)]``) spreads the reconnects of
many watches and many replicas after an API-server restart instead of having them arrive in waves.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

# Jitter, not cryptography: a seeded-per-process PRNG is what is wanted here.
_RANDOM = random.Random()  # noqa: S311


@dataclass(frozen=True, slots=True)
class Backoff:
    """:param base: the first ceiling, in seconds. :param cap: no delay is ever longer than this.
    :param rand: ``[0, 1)`` source, injectable so tests can make the delays deterministic."""

    base: float = 0.2
    cap: float = 30.0
    rand: Callable[[], float] = field(default=_RANDOM.random)

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (0 for the first retry)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt, 62))
        return self.rand() * ceiling
