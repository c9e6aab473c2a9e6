"""The margin kept back from an RPC's deadline to send the answer (extsvc.deadline.AnswerMargin)."""

from __future__ import annotations

import pytest

from extsvc.deadline import AnswerMargin


@pytest.mark.parametrize(
    ("remaining_s", "budget_s"),
    [
        (0.2, 0.18),     # Envoy's default ext_authz timeout: the 20 ms floor
        (1.0, 0.9),      # 10% once that is more than the floor
        (10.0, 9.0),
        (0.1, 0.08),     # the floor again
        (0.03, 0.015),   # a short deadline: never more than half kept back
        (0.0, 0.0),
        (-0.5, 0.0),     # already past: no time at all, never negative
    ],
)
def test_the_margin_grows_with_the_deadline_above_a_floor_and_below_half(
    remaining_s: float, budget_s: float
) -> None:
    assert AnswerMargin(floor_s=0.02, ratio=0.1).budget(remaining_s) == pytest.approx(budget_s)


def test_lateness_seen_is_kept_back_too_and_decays() -> None:
    margin = AnswerMargin(floor_s=0.02, ratio=0.1, clock=lambda: 100.0)
    margin.observe(0.008)  # an answer ready 8 ms after its step deadline
    assert margin.budget(0.2) == pytest.approx(0.172)
    margin.observe(0.0)    # the loop caught up: half of it is forgotten per on-time answer
    assert margin.budget(0.2) == pytest.approx(0.176)
    for _ in range(20):
        margin.observe(0.0)
    assert margin.budget(0.2) == pytest.approx(0.18)
    margin.observe(0.5)    # however late answers were, a deadline keeps half of its time
    assert margin.budget(0.2) == pytest.approx(0.1)


def test_lateness_seen_halves_every_second_without_a_late_answer() -> None:
    now = [100.0]
    margin = AnswerMargin(floor_s=0.02, ratio=0.1, clock=lambda: now[0])
    margin.observe(0.016)
    assert margin.budget(0.2) == pytest.approx(0.164)
    now[0] += 1.0
    assert margin.budget(0.2) == pytest.approx(0.172)
    now[0] += 2.0
    assert margin.budget(0.2) == pytest.approx(0.178)
    now[0] += 60.0
    assert margin.budget(0.2) == pytest.approx(0.18) and margin.lag_s == 0.0


def test_the_old_fixed_margin_is_a_setting_away() -> None:
    assert AnswerMargin(floor_s=0.005, ratio=0.0).budget(0.2) == pytest.approx(0.195)


@pytest.mark.parametrize(
    "kwargs", [{"floor_s": -1.0}, {"ratio": 1.0}, {"ratio": -0.1}, {"max_share": 0.0}]
)
def test_nonsense_margins_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="margin"):
        AnswerMargin(**kwargs)


async def test_a_stop_step_always_ends_and_says_why_it_was_cut(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from extsvc.deadline import stop_step

    logger = logging.getLogger("extsvc.test.stop")
    loop = asyncio.get_running_loop()
    cancelled: list[bool] = []

    async def hangs() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def fails() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="extsvc.test.stop"):
        began = loop.time()
        await stop_step("the hanging part", hangs(), loop.time() + 0.05, logger)
        await asyncio.sleep(0)
        assert loop.time() - began < 1 and cancelled == [True]
        await stop_step("the failing part", fails(), loop.time() + 1, logger)
        await stop_step("the quick part", asyncio.sleep(0), loop.time() + 1, logger)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "shutdown: the hanging part did not end in time; cancelled and abandoned",
        "shutdown: the failing part failed",
    ]
