"""Log helpers: the throttle that keeps per-request failure warnings from flooding the log."""

from __future__ import annotations

from extsvc.observability.logging import LogThrottle


def test_log_throttle_lets_one_record_per_interval_through_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = LogThrottle(interval_s=10, clock=lambda: now[0])
    assert throttle.allow("store") == 0
    assert [throttle.allow("store") for _ in range(3)] == [None, None, None]
    assert throttle.allow("other") == 0          # keys are independent
    now[0] += 10
    assert throttle.allow("store") == 3          # the next report says how many were held back
    assert throttle.allow("store") is None
