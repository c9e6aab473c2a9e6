"""Running plugin coroutines under a deadline without paying for a timer when they never wait.

Most steps and processors finish without suspending (a cache hit, a header check). Arming an
event-loop timer for them costs more than the step itself (``loop.call_at`` + ``cancel`` is a
TimerHandle, a heap push and a cancelled entry for the loop to sweep, per request or message),
and a timer can only fire while the code it guards is suspended anyway. So a step's coroutine is
started eagerly with ``send(None)``; only if it suspends is the deadline timer armed, and the
coroutine is then awaited from where it stopped (:func:`resume`). The behaviour is the one of
arming the timer first: the same absolute deadline, the same cancellation on expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar, cast

T = TypeVar("T")


class Deadline:
    """One timer for a whole policy run, armed on the first suspension.

    :param when: event-loop time at which the running task is cancelled.
    ``expired`` is set when the timer fired (then the ``CancelledError`` is ours to answer).
    """

    __slots__ = ("expired", "task", "timer", "when")

    def __init__(self, when: float) -> None:
        self.when = when
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[Any] | None = None
        self.expired = False

    def arm(self) -> None:
        if self.timer is None:
            self.task = asyncio.current_task()
            assert self.task is not None
            self.timer = asyncio.get_running_loop().call_at(self.when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        assert self.task is not None
        self.task.cancel()

    def disarm(self) -> None:
        """Cancel the timer; undo our cancel request if the awaited code swallowed it."""
        if self.timer is not None:
            self.timer.cancel()
            if self.expired and self.task is not None and self.task.cancelling():
                self.task.uncancel()

    def consume(self) -> bool:
        """In an ``except CancelledError``: true if the cancellation was our expiry (and only
        ours), which the caller then answers instead of re-raising."""
        if not self.expired:
            return False  # cancelled from outside (the RPC was cancelled): not ours to answer
        self.expired = False  # our cancel request is consumed here, not in disarm()
        assert self.task is not None
        return self.task.uncancel() == 0


def start(awaitable: Awaitable[T]) -> tuple[T, None] | tuple[None, Awaitable[T]]:
    """Run ``awaitable`` (a plugin's ``check()``/hook result) up to its first suspension.

    ``(result, None)`` when it finished without suspending (most steps do: they answer from
    memory), so no timer is armed; ``(None, rest)`` when it suspended or is not a coroutine: arm
    the deadline, then ``await rest`` for the result. This is the one place that decides whether a
    deadline is needed: :func:`run_guarded` uses it, and so do the ext_authz and ext_proc chains,
    which call it from their own loop to spare a coroutine per step.
    """
    if type(awaitable) is not types.CoroutineType:
        return None, awaitable
    try:
        waiting_on = awaitable.send(None)
    except StopIteration as done:
        return done.value, None
    return None, resume(awaitable, waiting_on)


async def run_guarded(awaitable: Awaitable[T], deadline: Deadline) -> T:
    """Await ``awaitable``; arm ``deadline`` only if it suspends (see :func:`start`)."""
    result, rest = start(awaitable)
    if rest is None:
        return cast("T", result)
    deadline.arm()
    return await rest


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], waiting_on: Any) -> Generator[Any, Any, T]:
    """Go on awaiting ``coro`` after a ``send(None)`` that suspended on ``waiting_on``.

    The delegation ``await`` does (PEP 380): what the task sends or throws in goes to ``coro``.
    """
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 (delegated to coro, as `await` would)
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                result: T = done.value
                return result
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                result = done.value
                return result


class AnswerMargin:
    """The part of an RPC's remaining time kept back to send the answer before the deadline.

    An answer given after the caller's deadline is no answer: Envoy gives up first and applies its
    own ``failure_mode_allow`` (with ``true``, a policy's ``on_error: deny`` becomes an allow). A
    fixed few milliseconds lose that race as soon as the event loop is busy (timers fire late, and
    many expire together when a dependency hangs), so the margin grows with the deadline:
    ``max(floor_s, ratio * remaining)``, plus the lateness recently seen (see :meth:`observe`),
    but never more than ``max_share`` of the remaining time, so a short deadline still leaves the
    steps most of it. With the defaults: 200 ms -> 30 ms kept back, 1 s -> 100 ms, 40 ms -> 20 ms.
    """

    __slots__ = ("_clock", "_lag_at", "floor_s", "lag_s", "max_share", "ratio")

    #: seconds after which the lateness seen is halved when no late answer renews it
    LAG_HALF_LIFE_S = 1.0

    def __init__(
        self,
        floor_s: float = 0.03,
        ratio: float = 0.1,
        max_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if floor_s < 0 or not 0 <= ratio < 1 or not 0 < max_share < 1:
            raise ValueError("margin: floor_s >= 0, 0 <= ratio < 1 and 0 < max_share < 1")
        self.floor_s = floor_s
        self.ratio = ratio
        self.max_share = max_share
        self._clock = clock
        #: how late answers to expired deadlines were recently ready (a decaying maximum)
        self.lag_s = 0.0
        self._lag_at = 0.0

    def budget(self, remaining: float) -> float:
        """The time the steps get out of ``remaining`` seconds (never negative)."""
        if remaining <= 0.0:
            return 0.0
        margin = remaining * self.ratio
        if margin < self.floor_s:
            margin = self.floor_s
        if self.lag_s:  # 0 unless answers were late lately: no clock read on the common path
            margin += self._lag()
        cap = remaining * self.max_share
        if margin > cap:
            margin = cap
        return remaining - margin

    def observe(self, late_s: float) -> None:
        """Record how long after a step deadline its ``on_error`` answer was ready.

        That is event-loop lag (timers fire late on a busy loop) plus the time to build the
        answer; later budgets keep it back too. A later on-time answer halves it, and so does
        every second without a late one, so one slow moment does not cost every later request
        its time.
        """
        lag = self._lag() if self.lag_s else 0.0
        self.lag_s = late_s if late_s > lag else (lag + late_s) / 2
        self._lag_at = self._clock()

    def _lag(self) -> float:
        now = self._clock()
        age = now - self._lag_at
        if age >= self.LAG_HALF_LIFE_S:
            lag = self.lag_s * 0.5 ** (age / self.LAG_HALF_LIFE_S)
            self.lag_s = lag if lag >= 0.0001 else 0.0
            self._lag_at = now
        return self.lag_s


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``async with asyncio.timeout(timeout_s): return await awaitable``, for about a third of
    the cost (one bare timer, none if ``awaitable`` finishes without suspending).

    :raises TimeoutError: when ``timeout_s`` passed first.
    """
    guard = Deadline(asyncio.get_running_loop().time() + timeout_s)
    try:
        return await run_guarded(awaitable, guard)
    except asyncio.CancelledError:
        if guard.consume():
            raise TimeoutError from None
        raise
    finally:
        guard.disarm()


async def stop_step(what: str, step: Awaitable[object], deadline: float, logger: logging.Logger) -> None:
    """Await one step of a shutdown until ``deadline`` (loop time); past it, cancel the step, log
    it on ``logger`` and go on (a stop must always end). A step that fails is logged too."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(forget)
        logger.error("shutdown: %s did not end in time; cancelled and abandoned", what)
        return
    if not task.cancelled() and task.exception() is not None:
        logger.error("shutdown: %s failed", what, exc_info=task.exception())


def forget(task: asyncio.Future[Any]) -> None:
    """A done callback for a task nobody awaits any more: its exception counts as seen (no
    "exception was never retrieved" at garbage collection)."""
    if not task.cancelled():
        task.exception()
