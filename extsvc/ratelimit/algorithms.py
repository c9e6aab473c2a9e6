"""Window and bucket maths: pure functions of (stored state, now), shared by every store.

Each algorithm is split in three parts so that the memory store, the Redis Lua script and the
tests agree to the integer:

1. ``*_op`` — what the store must do for one descriptor (keys and integer arguments), computed
   from the clock by the server, so the store never reads a clock of its own;
2. ``*_step`` — the atomic read-modify-write on the stored value (the memory store calls it, the
   Lua script in :mod:`extsvc.ratelimit.store.redis` is a line-by-line transcription);
3. ``*_status`` — the store's answer turned into what Envoy sees (over or not, remaining, reset).

Only integers cross the store boundary (Redis turns Lua numbers into integers), and every division
is an integer floor division, so Python and Lua give identical results.

fixed_window
    envoyproxy/ratelimit's algorithm and key scheme (docs/internals/envoy-behaviour.md §4.4): key
    ``<prefix><domain>_<k>_<v>_..._<windowStart>`` with ``windowStart = now // W * W`` in unix
    seconds, ``INCRBY hits``, the key expires with the window; over when the count after the
    increment exceeds the limit. Over-limit hits are counted too (as ratelimit does).
sliding_window
    The two-window approximation: ``estimate = ceil(prev * (W - elapsed) / W) + current``; a
    request is admitted, and counted, only if ``estimate + hits <= limit``. It never admits more
    than the limit within one aligned window, and over any interval of length W it admits at most
    ``2 * limit - 1`` in the worst case (all of the previous window's hits bunched at its end);
    with evenly spread traffic it is within one request of the exact sliding log. Rejected hits are
    not counted, so a client over the limit gets through again as soon as the estimate decays.
token_bucket
    GCRA (the generic cell rate algorithm): one stored value, the theoretical arrival time (TAT,
    in microseconds). Emission interval ``T = W / limit``; a request of ``n`` hits is admitted if
    ``max(TAT, now) + n*T - now <= burst * T``. ``burst`` defaults to the limit (a full bucket
    holds one window's worth). ``T`` is rounded down to a whole microsecond, so the effective rate
    is at most 1 µs per request faster than configured.

Hits above a limit's capacity (``requests_per_unit``; ``burst`` for the token bucket) are simply
over the limit: :func:`clamp_hits` makes them ``capacity + 1`` before they reach a store (every
``*_op`` clamps too), so a ``hits_addend`` near 2^64 is the same small integer in Python and Lua,
counts as capacity + 1, and its ``duration_until_reset`` is at most the window (the time the
bucket takes to fill for the token bucket).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Algorithm(StrEnum):
    FIXED_WINDOW = "fixed_window"
    SLIDING_WINDOW = "sliding_window"
    TOKEN_BUCKET = "token_bucket"  # noqa: S105 (not a password)


#: Parts per million: the resolution of the sliding window's weight of the previous window.
PPM = 1_000_000
#: Above every limit (limits are uint32): the most hits one fixed-window operation adds.
MAX_HITS = 2**32


def clamp_hits(hits: int, capacity: int) -> int:
    """``hits``, or ``capacity + 1`` when it is more: over the limit either way."""
    return capacity + 1 if hits > capacity else hits


@dataclass(frozen=True, slots=True)
class Op:
    """One descriptor's store operation: the base of :class:`FixedOp`, :class:`SlidingOp` and
    :class:`GcraOp`, which the ``*_op`` functions build and which name their arguments.

    A store tells them apart with ``isinstance`` (or ``match``) and reads the named fields. The
    generic names stay as they were: ``kind`` is ``f`` (fixed), ``s`` (sliding, keys = current and
    previous window) or ``g`` (GCRA), and ``a``, ``b``, ``c`` are the kind's integer arguments in
    the order the named fields list them (the Redis script's ARGV).
    """

    kind: str
    keys: tuple[str, ...]
    hits: int
    a: int
    b: int
    c: int

    @property
    def key(self) -> str:
        """The first (for a sliding window: the current window's) key."""
        return self.keys[0]


class FixedOp(Op):
    """Fixed window: add ``hits`` to ``key``; a new key expires after ``expiry_ms``.
    The store answers ``(count after, 0)``."""

    __slots__ = ()
    __match_args__ = ("key", "hits", "expiry_ms")

    @property
    def expiry_ms(self) -> int:
        return self.a


class SlidingOp(Op):
    """Sliding window (keys: ``current``, ``previous`` window): if admitted (see
    :func:`sliding_step`) add ``hits`` to ``current``, expiring after ``expiry_ms``.
    The store answers ``(admitted 0/1, usage)``."""

    __slots__ = ()
    __match_args__ = ("current", "previous", "hits", "limit", "weight_ppm", "expiry_ms")

    @property
    def current(self) -> str:
        return self.keys[0]

    @property
    def previous(self) -> str:
        return self.keys[1]

    @property
    def limit(self) -> int:
        return self.a

    @property
    def weight_ppm(self) -> int:
        """The weight of the previous window, in parts per million."""
        return self.b

    @property
    def expiry_ms(self) -> int:
        return self.c


class GcraOp(Op):
    """Token bucket (GCRA) on ``key``, the stored TAT in µs (see :func:`gcra_step`); if admitted
    store the new TAT (the key may expire once ``now_us`` passes it).
    The store answers ``(admitted 0/1, tat)``."""

    __slots__ = ()
    __match_args__ = ("key", "hits", "interval_us", "tolerance_us", "now_us")

    @property
    def interval_us(self) -> int:
        """The emission interval T."""
        return self.a

    @property
    def tolerance_us(self) -> int:
        """``burst * T``."""
        return self.b

    @property
    def now_us(self) -> int:
        return self.c


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a descriptor's store answer means for Envoy."""

    over: bool
    remaining: int
    reset_s: int
    before: int  # usage before this request's hits (for near-limit accounting)
    after: int  # usage after them (equal to ``before`` when rejected without counting)


# --- fixed window ---------------------------------------------------------------------------


def fixed_window_start(now_s: int, window_s: int) -> int:
    return now_s // window_s * window_s


def fixed_op(base_key: str, hits: int, window_s: int, now_s: int) -> FixedOp:
    """``expiry_ms`` (``a``) = the window length. ``hits`` should be clamped by the caller
    (:func:`clamp_hits`); here only to :data:`MAX_HITS`, over any limit."""
    if hits > MAX_HITS:
        hits = MAX_HITS
    return FixedOp("f", (f"{base_key}{fixed_window_start(now_s, window_s)}",), hits, window_s * 1000, 0, 0)


def fixed_step(count: int, hits: int) -> int:
    return count + hits


def fixed_status(count_after: int, hits: int, limit: int, window_s: int, now_s: int) -> Outcome:
    reset = window_s - now_s % window_s
    if count_after > limit:
        return Outcome(True, 0, reset, count_after - hits, count_after)
    return Outcome(False, limit - count_after, reset, count_after - hits, count_after)


# --- sliding window (two-window approximation) ----------------------------------------------


def sliding_op(base_key: str, hits: int, limit: int, window_s: int, now_ms: int) -> SlidingOp:
    """``limit`` (``a``), ``weight_ppm`` of the previous window (``b``), ``expiry_ms`` (``c``)."""
    hits = clamp_hits(hits, limit)
    window_ms = window_s * 1000
    start_ms = now_ms - now_ms % window_ms
    weight = (window_ms - (now_ms - start_ms)) * PPM // window_ms
    # Both windows' keys must share a Redis Cluster slot (one script touches both): tag the base,
    # unless it is tagged already (store hash_tag: true).
    base = base_key if "{" in base_key else f"{{{base_key}}}"
    current = f"{base}sw_{start_ms // 1000}"
    previous = f"{base}sw_{(start_ms - window_ms) // 1000}"
    return SlidingOp("s", (current, previous), hits, limit, weight, 2 * window_ms)


def sliding_estimate(previous: int, current: int, weight_ppm: int) -> int:
    # Rounded up: rounding down would let one extra request through near a window's end.
    return (previous * weight_ppm + PPM - 1) // PPM + current


def sliding_step(previous: int, current: int, hits: int, limit: int, weight_ppm: int) -> tuple[int, int]:
    """``(admitted 0/1, usage)``: usage includes ``hits`` only when admitted."""
    estimate = sliding_estimate(previous, current, weight_ppm)
    if estimate + hits > limit:
        return 0, estimate
    return 1, estimate + hits


def sliding_status(admitted: int, usage: int, hits: int, limit: int, window_s: int, now_s: int) -> Outcome:
    # Reset: the end of the current aligned window, an upper bound of when the estimate has room.
    reset = window_s - now_s % window_s
    if not admitted:
        return Outcome(True, 0, reset, usage, usage)
    return Outcome(False, limit - usage, reset, usage - hits, usage)


# --- token bucket (GCRA) --------------------------------------------------------------------


def gcra_interval_us(limit: int, window_s: int) -> int:
    return max(1, window_s * 1_000_000 // limit)


def gcra_op(base_key: str, hits: int, limit: int, burst: int, window_s: int, now_us: int) -> GcraOp:
    """``interval_us`` T (``a``), ``tolerance_us`` = ``burst * T`` (``b``), ``now_us`` (``c``)."""
    interval = gcra_interval_us(limit, window_s)
    hits = clamp_hits(hits, burst)
    return GcraOp("g", (f"{base_key}tb",), hits, interval, burst * interval, now_us)


def gcra_step(tat: int, hits: int, interval_us: int, tolerance_us: int, now_us: int) -> tuple[int, int]:
    """``(admitted 0/1, tat)``: the new TAT when admitted (to be stored), else the current one."""
    tat = max(tat, now_us)
    new_tat = tat + hits * interval_us
    if new_tat - now_us > tolerance_us:
        return 0, tat
    return 1, new_tat


def gcra_status(admitted: int, tat: int, hits: int, interval_us: int, tolerance_us: int,
                now_us: int) -> Outcome:
    capacity = tolerance_us // interval_us
    used_after = -(-(tat - now_us) // interval_us)  # ceil: cells still "in the bucket"
    if not admitted:
        # the time until the hits fit; for more than the bucket holds, until it is full again
        wait_us = tat - now_us if hits > capacity else tat + hits * interval_us - tolerance_us - now_us
        return Outcome(True, 0, max(1, -(-wait_us // 1_000_000)), used_after, used_after)
    remaining = (tolerance_us - (tat - now_us)) // interval_us
    reset = -(-(tat - now_us) // 1_000_000)  # seconds until the bucket is full again
    return Outcome(False, min(remaining, capacity), reset, max(0, used_after - hits), used_after)


# --- accounting -----------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Hit counts of one descriptor, as envoyproxy/ratelimit's stats count them."""

    over: int = 0
    near: int = 0
    within: int = 0


def tally(outcome: Outcome, hits: int, limit: int, near_ratio: float) -> Tally:
    """Split ``hits`` into over / near / within the limit (ratelimit's base_limiter rules).

    The near-limit threshold is ``floor(limit * near_ratio)``; hits that land above it but within
    the limit are near-limit hits (limit 15, ratio 0.8: the 13th hit is the first near one).
    """
    threshold = int(limit * near_ratio)
    before, after = outcome.before, outcome.after
    if outcome.over:
        if outcome.after == outcome.before:  # rejected without counting (sliding, GCRA)
            return Tally(over=hits)
        if before >= limit:
            return Tally(over=hits)
        return Tally(over=after - limit, near=max(0, limit - max(threshold, before)))
    near = 0
    if after > threshold:
        near = hits if before >= threshold else after - threshold
    return Tally(near=near, within=hits)
