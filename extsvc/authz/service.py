"""The thin gRPC adapter for ``envoy.service.auth.v3.Authorization``.

Envoy -> convert -> compiled policy -> decision -> convert -> Envoy. The RPC always completes with
gRPC OK; denials and internal failures travel inside the CheckResponse
(docs/internals/envoy-behaviour.md §2.2).
"""

from __future__ import annotations

import logging
from asyncio import get_running_loop
from time import perf_counter
from typing import TYPE_CHECKING, Any

from envoy.service.auth.v3 import external_auth_pb2_grpc

from extsvc.authz.convert import (
    EnvoyCheckContext,
    rejected_outcome,
    to_check_context,
    to_check_response,
)
from extsvc.authz.pipeline import Outcome
from extsvc.deadline import AnswerMargin
from extsvc.grpcutil import UNKNOWN_POLICY_LABEL, call_authority, printable
from extsvc.limits import Rejections, RequestLimits
from extsvc.observability.decisions import (
    MAX_FIELD,
    DecisionLog,
    DecisionRecord,
    bounded,
    trace_id_of,
)
from extsvc.observability.logging import LogThrottle, redact_headers
from extsvc.observability.metrics import Metrics
from extsvc.plugin.check import Decision

if TYPE_CHECKING:
    from extsvc.authz.pipeline import CompiledPolicy
    from extsvc.observability.tracing import RpcSpan, StepTrace, Tracing
    from extsvc.plugin.check import CheckContext
    from extsvc.reload.runtime import RuntimeHolder

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"

# Not ready yet: an error_response without a status, so Envoy applies its own status_on_error /
# failure_mode_allow exactly as if the server were down.
_NOT_READY = to_check_response(
    Decision.deny(503, grpc_code=14, reason="no config loaded yet"), envoy_error=True
)
_BAD_REQUEST = to_check_response(Decision.deny(400, "bad request", grpc_code=3))
_UNKNOWN_POLICY = to_check_response(Decision.deny(403, grpc_code=7))


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        *,
        deadline_margin_s: float = 0.03,
        deadline_margin_ratio: float = 0.1,
        default_timeout_s: float = 1.0,
        limits: RequestLimits | None = None,
        max_inflight: int = 8192,
        decisions: DecisionLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """:param decisions: the decision log (None or off: nothing recorded).
        :param tracing: the tracer (None: tracing off)."""
        self._holder = holder
        self._decisions = decisions if decisions is not None and decisions.active else None
        self._tracing = tracing
        self._durations = metrics.request_durations("ext_authz")
        self._handled_ok = metrics.hot(metrics.grpc_handled.labels("ext_authz", "Check", "OK"))
        self._handled_cancelled = metrics.hot(
            metrics.grpc_handled.labels("ext_authz", "Check", "CANCELLED")
        )
        self._limits = limits or RequestLimits()
        self._rejections = Rejections(metrics, "authz")
        self._metrics = metrics
        #: per-request failure warnings, once per cause and interval (the metrics count all)
        self._throttle = LogThrottle()
        #: what is kept back from the RPC's deadline to send the answer (see AnswerMargin)
        self.margin = AnswerMargin(deadline_margin_s, deadline_margin_ratio)
        self._default_timeout = default_timeout_s
        self._not_ready = metrics.hot(metrics.authz_decisions.labels("", "error"))
        #: Checks in progress now, and the cap beyond which new ones are shed
        self.inflight = 0
        self._max_inflight = max_inflight
        self._shed = metrics.hot(metrics.shed.labels("ext_authz"))
        self._lateness = metrics.hot(metrics.answer_lateness)
        # Unknown policy names come from requests: one label value for all of them, so an
        # attacker naming 20,000 policies adds one series, not 20,000.
        self._unknown = {
            known: (
                metrics.hot(metrics.unknown_policy.labels(label)),
                metrics.hot(metrics.authz_decisions.labels(label, "deny")),
            )
            for known, label in ((True, UNKNOWN_POLICY_LABEL), (False, ""))
        }

    async def Check(self, request: Any, context: Any) -> Any:
        # One frame for the whole RPC (no helper coroutine): this runs for every request.
        runtime = self._holder.current
        if runtime is None:
            self._not_ready.inc()
            self._handled_ok.inc()
            held = self._throttle.allow("not-ready")
            if held is not None:
                log.warning("Check before the first config load: answering as an error "
                            "(%d more since the last report)", held)
            if self._decisions is not None:
                self._decisions.record(DecisionRecord(
                    self._decisions.clock(), "ext_authz", "", "error", 503,
                    reason="no config loaded yet", worker=self._decisions.worker,
                ))
            return _NOT_READY
        started = perf_counter()  # (uvloop's loop.time() counts whole milliseconds)
        runtime.enter()
        self.inflight += 1
        tracing = self._tracing
        span = None if tracing is None else tracing.begin(SERVICE_NAME, "Check", context)
        steps: list[StepTrace] | None = None if span is None else []
        answered = False
        try:
            remaining = context.time_remaining()
            budget = self._default_timeout if remaining is None else self.margin.budget(remaining)
            loop = get_running_loop()
            deadline = loop.time() + budget
            try:
                check = to_check_context(request, self._limits)
            except Exception as exc:  # noqa: BLE001 (malformed input is denied, never crashes)
                self._metrics.bad_requests.inc()
                log.warning("unreadable CheckRequest denied with 400: %r", exc)
                answered = True
                if self._decisions is not None:
                    self._decisions.record(DecisionRecord(
                        self._decisions.clock(), "ext_authz", "", "deny", 400,
                        reason="unreadable CheckRequest", latency_s=perf_counter() - started,
                        worker=self._decisions.worker,
                    ))
                if span is not None:
                    span.finish({"extsvc.decision": "deny"}, error="unreadable CheckRequest")
                return _BAD_REQUEST

            if runtime.authority_matters:
                name, policy = runtime.select(check.context_extensions, lambda: call_authority(context))
            else:  # no policy the authority could pick differs from the default: skip reading it
                name, policy = runtime.select(check.context_extensions, "")
            if policy is None:
                answered = True
                return self._unknown_policy(name, check, perf_counter() - started, span)

            check.bind(name)
            try:
                if self.inflight > self._max_inflight:  # overloaded: no step runs, per on_error
                    outcome = self._shed_outcome(policy, check)
                elif check.over_limit is None:
                    outcome = await policy.evaluate(check, deadline, steps)
                else:
                    outcome = rejected_outcome(policy, check, self._rejections)  # never an allow
            except Exception:  # a bug of ours still gets a policy answer, never an aborted RPC
                log.exception("policy %s failed outside any step [request_id=%s]", name,
                              check.request_id)
                outcome = policy.internal_error(check)
            label = outcome.label
            policy.counters[label].inc()
            if label == "error":  # how late after the deadline the answer is: keep that back too
                late = loop.time() - deadline
                if late > 0.0:
                    self._lateness.observe(late)
                    self.margin.observe(late)
                else:
                    self.margin.observe(0.0)
            latency = perf_counter() - started
            self._durations.get(name).observe(latency)
            if self._decisions is not None:
                self._decisions.record(self._record(name, check, outcome, latency, span))
            if span is not None:
                self._finish_span(span, name, outcome, steps)
            if log.isEnabledFor(logging.DEBUG):
                decision = outcome.decision
                log.debug(
                    "%s %s %s -> %s %s by %s (%s) [request_id=%s] headers=%s",
                    name, check.method, check.path, outcome.label,
                    decision.status, outcome.step or "default", decision.reason, check.request_id,
                    redact_headers(check.headers),
                    extra={"request_id": check.request_id},
                )
            answered = True
            return to_check_response(outcome.decision, envoy_error=outcome.envoy_error)
        finally:
            self.inflight -= 1
            runtime.leave()
            if answered:
                self._handled_ok.inc()
            else:  # cancelled (Envoy gave up) or a bug above: no answer went out
                self._handled_cancelled.inc()
                if span is not None:
                    span.finish({}, grpc_code=1, error="cancelled")

    def _record(
        self, name: str, check: EnvoyCheckContext, outcome: Outcome, latency: float,
        span: RpcSpan | None, detail: tuple[tuple[str, str], ...] | None = None,
    ) -> DecisionRecord:
        """The decision log's record of one answered Check. Built for every Check (by
        default): it reads the few headers it needs from the request's map, and decodes
        nothing a step did not."""
        decisions = self._decisions
        assert decisions is not None
        decision = outcome.decision
        header = check.header
        # Every text is bounded (a record may be kept, and held by readers); the checks are
        # inline, as the values are nearly always short.
        reason = decision.reason
        request_id = header("x-request-id") or ""
        host = check.host
        path = check.path
        method = check.method
        return DecisionRecord(
            decisions.clock(), "ext_authz", name, outcome.label,
            0 if decision.allowed else decision.status, outcome.step,
            reason if len(reason) <= MAX_FIELD else bounded(reason),
            latency, request_id if len(request_id) <= 128 else bounded(request_id, 128),
            span.trace_id if span is not None else trace_id_of(header),
            host if len(host) <= 256 else bounded(host, 256),
            path if len(path) <= MAX_FIELD else bounded(path),  # no query: CheckContext.path
            method if len(method) <= 16 else bounded(method, 16),
            check.source_address,
            detail if detail is not None
            else decisions.header_detail(check.headers) if decisions.headers else (),
            decisions.worker,
        )

    @staticmethod
    def _finish_span(
        span: RpcSpan, name: str, outcome: Outcome, steps: list[StepTrace] | None
    ) -> None:
        decision = outcome.decision
        if steps:
            span.steps(steps)
        attributes: dict[str, Any] = {
            "extsvc.policy": name, "extsvc.decision": outcome.label,
            "extsvc.step": outcome.step or "default",
        }
        if not decision.allowed:
            attributes["extsvc.status"] = decision.status
        if decision.reason:
            attributes["extsvc.reason"] = bounded(decision.reason)
        span.finish(attributes, error=decision.reason if outcome.label == "error" else "")

    def _shed_outcome(self, policy: CompiledPolicy, check: CheckContext) -> Outcome:
        """A Check over ``max_inflight``: the policy's ``on_error`` answer, without its steps."""
        self._shed.inc()
        held = self._throttle.allow("shed")
        if held is not None:
            log.warning(
                "%d Checks in progress (max_authz_inflight %d): answering per on_error without "
                "running the steps (%d more since the last report) [request_id=%s]",
                self.inflight - 1, self._max_inflight, held, check.request_id,
                extra={"request_id": check.request_id},
            )
        return policy.internal_error(check, "overloaded")

    def _unknown_policy(
        self, name: str, check: EnvoyCheckContext, latency: float, span: RpcSpan | None
    ) -> Any:
        unknown, denied = self._unknown[bool(name)]
        unknown.inc()
        denied.inc()
        label = UNKNOWN_POLICY_LABEL if name else ""
        self._durations.get(label).observe(latency)
        reason = "unknown policy" if name else "no policy chosen and no default_policy"
        if self._decisions is not None:
            outcome = Outcome(Decision.deny(403, reason=reason), "deny")
            detail = (("policy", bounded(printable(name), 128)),) if name else ()
            self._decisions.record(self._record(label, check, outcome, latency, span, detail))
        if span is not None:
            span.finish({"extsvc.policy": label, "extsvc.decision": "deny",
                         "extsvc.reason": reason, "extsvc.status": 403})
        # throttled by cause, not by name: 20,000 names are one report per interval
        held = self._throttle.allow("unknown-policy" if name else "no-policy")
        if held is not None:
            log.warning(
                "denied: %s (%d more since the last report) [request_id=%s]",
                f"unknown policy {printable(name)}" if name
                else "no policy chosen and no default_policy",
                held, check.request_id,
                extra={"request_id": check.request_id},
            )
        return _UNKNOWN_POLICY
