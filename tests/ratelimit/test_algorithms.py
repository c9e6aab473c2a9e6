"""Window and bucket maths with a fake clock and Hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from extsvc.ratelimit import algorithms as alg


def simulate(kind: str, limit: int, window: int, times_ms: list[int], burst: int = 0) -> list[int]:
    """Admission times (ms) of one-hit requests at ``times_ms`` through the store-free steps."""
    state: dict[str, int] = {}
    admitted = []
    for t in times_ms:
        if kind == "f":
            op = alg.fixed_op("k_", 1, window, t // 1000)
            count = alg.fixed_step(state.get(op.keys[0], 0), 1)
            state[op.keys[0]] = count
            if not alg.fixed_status(count, 1, limit, window, t // 1000).over:
                admitted.append(t)
        elif kind == "s":
            op = alg.sliding_op("k_", 1, limit, window, t)
            ok, _ = alg.sliding_step(state.get(op.keys[1], 0), state.get(op.keys[0], 0), 1, limit, op.b)
            if ok:
                state[op.keys[0]] = state.get(op.keys[0], 0) + 1
                admitted.append(t)
        else:
            op = alg.gcra_op("k_", 1, limit, burst or limit, window, t * 1000)
            ok, tat = alg.gcra_step(state.get("tat", 0), 1, op.a, op.b, op.c)
            if ok:
                state["tat"] = tat
                admitted.append(t)
    return admitted


def max_in_interval(times: list[int], length_ms: int) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= length_ms:
            start += 1
        best = max(best, end - start + 1)
    return best


arrivals = st.lists(st.integers(0, 30_000), min_size=1, max_size=300).map(sorted)
limits = st.integers(1, 20)
windows = st.sampled_from([1, 2, 5, 10])


@settings(max_examples=150, deadline=None)
@given(arrivals, limits, windows)
def test_fixed_window_never_more_than_limit_per_aligned_window(
    times: list[int], limit: int, window: int
) -> None:
    admitted = simulate("f", limit, window, times)
    per_window: dict[int, int] = {}
    for t in admitted:
        per_window[t // 1000 // window] = per_window.get(t // 1000 // window, 0) + 1
    assert max(per_window.values(), default=0) <= limit
    # and it admits every request of a window until the limit is reached
    for w in {t // 1000 // window for t in times}:
        offered = sum(1 for t in times if t // 1000 // window == w)
        assert per_window.get(w, 0) == min(offered, limit)


@settings(max_examples=150, deadline=None)
@given(arrivals, limits, windows)
def test_sliding_window_bounds(times: list[int], limit: int, window: int) -> None:
    admitted = simulate("s", limit, window, times)
    per_window: dict[int, int] = {}
    for t in admitted:
        per_window[t // (window * 1000)] = per_window.get(t // (window * 1000), 0) + 1
    assert max(per_window.values(), default=0) <= limit  # never more than the limit per window
    assert max_in_interval(admitted, window * 1000) <= 2 * limit - 1  # the documented bound


@settings(max_examples=150, deadline=None)
@given(arrivals, limits, windows, st.integers(1, 10))
def test_token_bucket_is_a_leaky_bucket_of_burst_cells(
    times: list[int], limit: int, window: int, burst: int
) -> None:
    admitted = simulate("g", limit, window, times, burst)
    interval_ms = window * 1000 / limit
    # In any span of length L at most burst + L / T requests pass (GCRA's conformance bound).
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - start
            assert j - i + 1 <= burst + span / interval_ms + 1e-9
    # Requests spaced at least T apart always pass.
    spaced = list(range(0, 20 * int(interval_ms) + 1, int(interval_ms) + 1))
    assert simulate("g", limit, window, spaced, burst) == spaced


def test_fixed_window_maths_matches_ratelimit_examples() -> None:
    # docs/internals/envoy-behaviour.md §4.4: hour window at t=1000000 -> key ..._997200, reset 800 s
    op = alg.fixed_op("domain_key3_value3_", 1, 3600, 1_000_000)
    assert op.keys == ("domain_key3_value3_997200",)
    assert alg.fixed_status(1, 1, 10, 3600, 1_000_000) == alg.Outcome(False, 9, 800, 0, 1)
    assert alg.fixed_status(11, 1, 10, 3600, 1_000_000).over


def test_near_limit_accounting_like_ratelimit() -> None:
    # limit 15, ratio 0.8 -> threshold 12: hit 13 is the first near-limit one
    for count, expected in [(12, (0, 0, 1)), (13, (0, 1, 1)), (15, (0, 1, 1)), (16, (1, 0, 0))]:
        outcome = alg.fixed_status(count, 1, 15, 60, 0)
        t = alg.tally(outcome, 1, 15, 0.8)
        assert (t.over, t.near, t.within) == expected, count
    # a request of 5 hits going from 11 to 16: 1 over, 3 near (13..15)
    t = alg.tally(alg.fixed_status(16, 5, 15, 60, 0), 5, 15, 0.8)
    assert (t.over, t.near) == (1, 3)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, alg.PPM))
def test_sliding_estimate_is_integer_exact(previous: int, current: int, weight: int) -> None:
    # what the Lua script computes with doubles: (x - x % 1e6) / 1e6 + current
    x = float(previous * weight + alg.PPM - 1)
    assert (x - x % alg.PPM) / alg.PPM + current == alg.sliding_estimate(previous, current, weight)


def test_typed_ops_name_their_fields_and_keep_the_generic_names() -> None:
    fixed = alg.fixed_op("k_", 3, 60, 125)
    assert isinstance(fixed, alg.FixedOp) and isinstance(fixed, alg.Op)
    assert (fixed.kind, fixed.key, fixed.hits, fixed.expiry_ms) == ("f", "k_120", 3, 60_000)
    assert fixed == alg.fixed_op("k_", 3, 60, 120) and fixed.a == fixed.expiry_ms
    sliding = alg.sliding_op("k_", 1, 10, 60, 90_000)
    assert isinstance(sliding, alg.SlidingOp) and sliding.kind == "s"
    assert (sliding.current, sliding.previous) == sliding.keys
    assert (sliding.limit, sliding.weight_ppm, sliding.expiry_ms) == (sliding.a, sliding.b, sliding.c)
    assert (sliding.limit, sliding.weight_ppm, sliding.expiry_ms) == (10, 500_000, 120_000)
    gcra = alg.gcra_op("k_", 1, 10, 5, 60, 7)
    assert isinstance(gcra, alg.GcraOp) and gcra.kind == "g" and gcra.key == "k_tb"
    assert (gcra.interval_us, gcra.tolerance_us, gcra.now_us) == (gcra.a, gcra.b, gcra.c)
    assert (gcra.interval_us, gcra.tolerance_us, gcra.now_us) == (6_000_000, 30_000_000, 7)
    match fixed:
        case alg.FixedOp(key, hits, expiry_ms):
            assert (key, hits, expiry_ms) == ("k_120", 3, 60_000)
        case _:
            raise AssertionError(fixed)
