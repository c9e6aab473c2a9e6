"""The embedded store: counters in this process's memory.

Per process: with ``--workers N`` (or N replicas) every process counts on its own, so a client
spread over them gets up to N times the limit. Use Redis for one limit across processes.
Expired keys are dropped by a sweep over expiry buckets (one per second), never by a full scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from extsvc.ratelimit.algorithms import Op, fixed_step, gcra_step, sliding_step


class MemoryStore:
    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[int, int]] = {}  # key -> (value, expires at, unix ms)
        self._expiry: dict[int, list[str]] = {}  # expiry second -> keys that may expire then
        self._swept = int(clock())

    def __len__(self) -> int:
        return len(self._values)

    def _get(self, key: str, now_ms: int) -> int:
        entry = self._values.get(key)
        if entry is None:
            return 0
        if entry[1] <= now_ms:
            del self._values[key]
            return 0
        return entry[0]

    def _set(self, key: str, value: int, expires_ms: int) -> None:
        old = self._values.get(key)
        self._values[key] = (value, expires_ms)
        bucket = expires_ms // 1000 + 1
        if old is None or old[1] // 1000 + 1 != bucket:  # index each key once per second
            self._expiry.setdefault(bucket, []).append(key)

    async def apply(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        return self.apply_now(ops)

    def apply_now(self, ops: Sequence[Op]) -> list[tuple[int, int]]:
        """:meth:`apply` without a coroutine: nothing here waits."""
        now_ms = int(self._clock() * 1000)
        if now_ms // 1000 > self._swept:
            self._sweep(now_ms)
        out: list[tuple[int, int]] = []
        for op in ops:
            if op.kind == "f":
                key = op.keys[0]
                entry = self._values.get(key)
                if entry is not None and entry[1] > now_ms:
                    count = fixed_step(entry[0], op.hits)
                    self._values[key] = (count, entry[1])
                else:
                    count = op.hits
                    self._set(key, count, now_ms + op.a)
                out.append((count, 0))
            elif op.kind == "s":
                current = self._get(op.keys[0], now_ms)
                previous = self._get(op.keys[1], now_ms)
                admitted, usage = sliding_step(previous, current, op.hits, op.a, op.b)
                if admitted and op.hits:
                    self._set(op.keys[0], current + op.hits, now_ms + op.c)
                out.append((admitted, usage))
            else:  # "g"
                tat = self._get(op.keys[0], now_ms)
                admitted, new_tat = gcra_step(tat, op.hits, op.a, op.b, op.c)
                if admitted and op.hits:
                    ttl_ms = -(-(new_tat - op.c) // 1000)
                    self._set(op.keys[0], new_tat, now_ms + ttl_ms)
                out.append((admitted, new_tat))
        return out

    def _sweep(self, now_ms: int) -> None:
        now_s = now_ms // 1000
        if now_s - self._swept <= 64:
            due: list[int] = list(range(self._swept + 1, now_s + 1))
        else:  # a long pause or a clock jump: look at the buckets that exist instead
            due = [second for second in self._expiry if second <= now_s]
        for second in due:
            for key in self._expiry.pop(second, ()):
                entry = self._values.get(key)
                if entry is not None and entry[1] <= now_ms:
                    del self._values[key]
        self._swept = now_s

    async def aclose(self) -> None:
        self._values.clear()
        self._expiry.clear()
