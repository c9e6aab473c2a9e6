"""A compiled ext_authz policy: plain objects awaited in order, no pluggy, no parsing."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any

from extsvc.config.model import Combine, OnError
from extsvc.deadline import Deadline, start
from extsvc.observability.logging import LogThrottle
from extsvc.observability.tracing import StepTrace
from extsvc.plugin.check import CheckContext, Decision
from extsvc.plugin.protocols import Authorizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The policy's answer and how it came about (for metrics and the log).

    ``label`` is ``allow``, ``deny`` or ``error``; ``envoy_error`` asks the converter for an
    ``error_response`` (``on_error: envoy``).
    """

    decision: Decision
    label: str
    step: str = ""
    envoy_error: bool = False


@dataclass(frozen=True, slots=True)
class CompiledStep:
    label: str
    kind: str
    authorizer: Authorizer
    duration: Any  # prometheus Histogram child, labels bound at compile time
    raised: Any  # Counter child {reason="exception"}
    overran: Any  # Counter child {reason="timeout"}
    invalid: Any  # Counter child {reason="bad-result"}


class StepFailed(Exception):
    def __init__(self, step: CompiledStep, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"step {step.label!r} ({step.kind}) {reason}")


class CompiledPolicy:
    def __init__(
        self,
        name: str,
        steps: tuple[CompiledStep, ...],
        combine: Combine,
        on_error: OnError,
        default_decision: Decision,
        error_decision: Decision,
        timeout_s: float | None,
        counters: dict[str, Any],
        identity_headers: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self.steps = steps
        self.combine = combine
        self.on_error = on_error
        self.default_decision = default_decision
        self.error_decision = error_decision
        self.timeout_s = timeout_s
        #: extsvc_authz_decisions_total children by outcome label, bound at compile time
        self.counters = counters
        #: headers that carry an identity upstream (IdentitySource), scrubbed on every allow
        self.identity_headers = tuple(sorted(identity_headers))
        #: step failures are logged once per step, cause and interval (the metrics count all):
        #: a dependency that hangs fails every request at once, and a burst of warnings then
        #: delays the very answers that must beat the deadline
        self._throttle = LogThrottle()
        #: decisions derived from the steps' (mostly reused) decisions, by the identity of what
        #: they came from: see :class:`_Memo`
        self._merged = _Memo()
        self._scrubbed = _Memo()
        #: the on_error answers, built once: at compile time for the reasons known then, on
        #: first use for a step's failure (a dependency that hangs fails every request alike)
        self._errors: dict[tuple[str, str], Outcome] = {}
        self._default_outcome = Outcome(default_decision, "deny")
        for reason in ("internal error", "overloaded"):
            self._errors["", reason] = self._error_outcome(reason, "")

    async def evaluate(
        self, request: CheckContext, deadline: float, trace: list[StepTrace] | None = None
    ) -> Outcome:
        """Run the steps under ``deadline`` (event-loop time) and combine their answers.

        ``trace``, when given (the RPC is traced), gets one :data:`StepTrace` per step run.

        Every step shares the same absolute deadline, so one timer covers them all, armed only
        when a step actually suspends (:func:`extsvc.deadline.start`). The steps run in this one
        frame for the whole policy: this is the hottest loop of ext_authz, and each extra
        coroutine per step cost about a microsecond per request.
        """
        if self.timeout_s is not None:
            deadline = min(deadline, asyncio.get_running_loop().time() + self.timeout_s)
        guard = Deadline(deadline)
        step: CompiledStep | None = None
        combine = self.combine
        merged: Decision | None = None
        first_denial: Outcome | None = None
        try:
            for step in self.steps:
                started = perf_counter()
                try:
                    decision, rest = start(step.authorizer.check(request))
                    if rest is not None:  # it suspended: now the deadline matters
                        guard.arm()
                        decision = await rest
                except asyncio.CancelledError:
                    if trace is not None:
                        trace.append((step.label, step.kind, "timeout", started, perf_counter()))
                    raise
                except Exception as exc:  # isolating a plugin's failure is the point here
                    if trace is not None:
                        trace.append((step.label, step.kind, "error", started, perf_counter()))
                    raise self._raised(step, request, exc) from exc
                finally:
                    step.duration.observe(perf_counter() - started)
                if trace is not None:
                    trace.append((
                        step.label, step.kind,
                        "abstain" if decision is None else "allow" if getattr(decision, "allowed", False)
                        else "deny", started, perf_counter(),
                    ))
                if decision is None:
                    continue
                if type(decision) is not Decision and not isinstance(decision, Decision):
                    step.invalid.inc()
                    raise StepFailed(step, f"returned {type(decision).__name__}, not a Decision")
                if combine is Combine.FIRST_DECISIVE:
                    outcome = Outcome(decision, "allow" if decision.allowed else "deny", step.label)
                    break
                if combine is Combine.ALL_MUST_ALLOW:
                    if not decision.allowed:
                        outcome = Outcome(decision, "deny", step.label)
                        break
                    merged = decision if merged is None else self._merge(merged, decision)
                elif decision.allowed:  # ANY_ALLOW
                    outcome = Outcome(decision, "allow", step.label)
                    break
                elif first_denial is None:
                    first_denial = Outcome(decision, "deny", step.label)
            else:
                if merged is not None:
                    outcome = Outcome(merged, "allow", self.steps[-1].label)
                else:
                    outcome = first_denial or self._default_outcome
        except StepFailed as failure:
            outcome = self._on_failure(request, failure)
        except asyncio.CancelledError:
            if not guard.consume():
                raise
            if step is None:  # cannot happen: cancellation is delivered inside a step's await
                outcome = self.internal_error(request)
            else:
                step.overran.inc()
                outcome = self._on_failure(request, StepFailed(step, "overran the deadline"))
        finally:
            guard.disarm()
        if self.identity_headers and outcome.decision.allowed:
            outcome = self._scrub_identity(outcome)
        return outcome

    def _raised(self, step: CompiledStep, request: CheckContext, exc: Exception) -> StepFailed:
        step.raised.inc()
        reason = f"raised {type(exc).__name__}"
        held = self._throttle.allow(f"{step.label}:{reason}")
        if held is not None:
            log.warning(
                "policy %s: step %s (%s) raised %r%s [request_id=%s]",
                self.name, step.label, step.kind, exc, _held_back(held), request.request_id,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        return StepFailed(step, reason)

    def _scrub_identity(self, outcome: Outcome) -> Outcome:
        """Remove the identity headers the allowing decision did not set itself.

        In "jwt OR api-key" only the step that allowed vouches for an identity; an ``x-user``
        the client sent, or one another step would have set, must not reach the upstream. Only
        headers this decision does not set are listed, so the order in which Envoy applies
        ``headers`` and ``headers_to_remove`` does not matter.
        """
        decision = outcome.decision
        scrubbed = self._scrubbed.get(decision)
        if scrubbed is None:
            own = {name for name, _ in decision.upstream_set}
            stale = tuple(
                h for h in self.identity_headers if h not in own and h not in decision.upstream_remove
            )
            scrubbed = (
                replace(decision, upstream_remove=decision.upstream_remove + stale) if stale
                else decision
            )
            self._scrubbed.put(decision, scrubbed)
        if scrubbed is decision:
            return outcome
        return Outcome(scrubbed, outcome.label, outcome.step, outcome.envoy_error)

    def _merge(self, earlier: Decision, later: Decision) -> Decision:
        """``earlier.merge(later)``, remembered: in ``all-must-allow`` the steps mostly return
        the same decisions (a cached token's allow, a known key's allow), so their merge -- and
        then its scrub and its encoding -- is built once, not per request."""
        merged = self._merged.get(earlier, later)
        if merged is None:
            merged = earlier.merge(later)
            self._merged.put(earlier, merged, later)
        return merged

    def internal_error(self, request: CheckContext, reason: str = "internal error") -> Outcome:
        """The ``on_error`` answer for a failure outside any step (or no step run: overloaded)."""
        outcome = self._errors.get(("", reason))
        return outcome if outcome is not None else self._error_outcome(reason, "")

    def _error_outcome(self, reason: str, step: str) -> Outcome:
        if self.on_error is OnError.ALLOW:
            outcome = Outcome(Decision.allow(reason=reason), "error", step)
            # an allow that no step vouched for carries no identity either
            return self._scrub_identity(outcome) if self.identity_headers else outcome
        return Outcome(
            self.error_decision.with_reason(reason), "error", step, self.on_error is OnError.ENVOY
        )

    def _on_failure(self, request: CheckContext, failure: StepFailed) -> Outcome:
        held = self._throttle.allow(f"{failure.step.label}:{failure.reason}:answered")
        if held is not None:
            log.warning(
                "policy %s: %s; answering per on_error=%s%s [request_id=%s]",
                self.name, failure, self.on_error.value, _held_back(held), request.request_id,
            )
        key = (failure.step.label, failure.reason)
        outcome = self._errors.get(key)
        if outcome is None:
            outcome = self._error_outcome(
                f"error in step {failure.step.label}: {failure.reason}", failure.step.label
            )
            if len(self._errors) < _ERRORS_KEPT:  # reasons name exception types: a few per step
                self._errors[key] = outcome
        return outcome


#: most on_error answers a policy keeps (step x failure reason)
_ERRORS_KEPT = 256


class _Memo:
    """Decisions derived from one or two decisions, keyed by their identity (bounded).

    An entry holds the decisions it is keyed by, so their ids cannot be reused while it is
    kept; past ``max_entries`` the oldest entry goes (a decision built per request passes
    through and is forgotten). Decisions are plain value objects: memos live here, not on them.
    """

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._entries: dict[Any, tuple[Decision, Decision | None, Decision]] = {}

    def get(self, first: Decision, second: Decision | None = None) -> Decision | None:
        entry = self._entries.get(id(first) if second is None else (id(first), id(second)))
        if entry is not None and entry[0] is first and entry[1] is second:
            return entry[2]
        return None

    def put(self, first: Decision, result: Decision, second: Decision | None = None) -> None:
        entries = self._entries
        if len(entries) >= self._max:
            del entries[next(iter(entries))]
        key = id(first) if second is None else (id(first), id(second))
        entries[key] = (first, second, result)


def _held_back(held: int) -> str:
    """The note a throttled warning carries about the ones held back before it (if any)."""
    return f" ({held} more since the last report)" if held else ""
