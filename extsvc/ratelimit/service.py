"""The thin gRPC adapter for ``envoy.service.ratelimit.v3.RateLimitService``.

Envoy -> convert -> limiter -> answer -> convert -> Envoy. Decisions travel in ``overall_code``
(docs/internals/envoy-behaviour.md §4.2); the RPC fails only when there is nothing to decide with
(no ``ratelimit`` config yet: UNAVAILABLE; no domain or no descriptors: INVALID_ARGUMENT), which
Envoy answers per its own ``failure_mode_deny``.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.message import DecodeError

from extsvc.deadline import AnswerMargin
from extsvc.grpcutil import UNKNOWN_POLICY_LABEL, printable
from extsvc.observability.decisions import DecisionLog, DecisionRecord, bounded
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics
from extsvc.ratelimit.convert import encode_response, parse_request
from extsvc.ratelimit.limiter import Answer, Limiter

if TYPE_CHECKING:
    from extsvc.observability.tracing import RpcSpan, Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"
RateLimitResponse = rls_pb2.RateLimitResponse


class LimiterSource(Protocol):
    """Where the serving limiter is read from, per request: the reload layer swaps it (None: no
    ``ratelimit`` config serves)."""

    @property
    def limiter(self) -> Limiter | None: ...


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        source: LimiterSource,
        metrics: Metrics,
        *,
        deadline_margin_s: float = 0.03,
        deadline_margin_ratio: float = 0.1,
        default_timeout_s: float = 1.0,
        decisions: DecisionLog | None = None,
        tracing: Tracing | None = None,
        decision_values: bool = False,
    ) -> None:
        """:param decisions: the decision log (over-limit answers and errors; every answer at
            level ``all``).
        :param tracing: the tracer (None: off); descriptor values go on spans only when its
            ``descriptor_values`` is set.
        :param decision_values: put descriptor values in decision records (default: keys)."""
        self._source = source
        self._metrics = metrics
        self._decisions = decisions if decisions is not None and decisions.active else None
        self._tracing = tracing
        self._log_values = decision_values
        self._span_values = tracing is not None and tracing.descriptor_values
        self._durations = metrics.request_durations("ratelimit")
        self._handled_by_code: dict[str, Any] = {}
        #: what is kept back from the RPC's deadline to send the answer (see AnswerMargin)
        self._margin = AnswerMargin(deadline_margin_s, deadline_margin_ratio)
        self._default_timeout = default_timeout_s
        self._ok = metrics.hot(metrics.rl_responses.labels("ok"))
        self._over = metrics.hot(metrics.rl_responses.labels("over_limit"))
        self._error = metrics.hot(metrics.rl_responses.labels("error"))
        self._throttle = LogThrottle()
        self._handled_ok = self._handled("OK")

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        """The message form (in-process callers); the server registers :meth:`answer_wire`."""
        raw = await self.answer_wire(request.SerializeToString(), context)
        return RateLimitResponse.FromString(raw)

    async def answer_wire(self, raw: bytes, context: Any) -> bytes:
        """ShouldRateLimit from request bytes to response bytes (see convert.py's wire form)."""
        tracing = self._tracing
        span = None if tracing is None else tracing.begin(SERVICE_NAME, "ShouldRateLimit", context)
        started = perf_counter()
        answered = False
        try:
            limiter = self._source.limiter
            if limiter is None:
                answered = True
                return self._fail(context, grpc.StatusCode.UNAVAILABLE, "no ratelimit config loaded",
                                  "", started, span)
            try:
                request = parse_request(raw)
            except DecodeError as exc:
                held = self._throttle.allow("unreadable")
                if held is not None:
                    log.warning("unreadable RateLimitRequest answered INVALID_ARGUMENT: %s "
                                "(%d more since the last report)", exc, held)
                answered = True
                return self._fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                                  "unreadable RateLimitRequest", "", started, span)
            if not request.domain or not request.descriptors:
                answered = True
                return self._fail(
                    context, grpc.StatusCode.INVALID_ARGUMENT,
                    "rate limit domain must not be empty" if not request.domain
                    else "rate limit descriptor list must not be empty", request.domain, started, span,
                )
            budget = None
            if limiter.remote:  # only a store that waits needs the RPC's budget
                remaining = context.time_remaining()
                budget = self._default_timeout if remaining is None else self._margin.budget(remaining)
            answer = await limiter.should_rate_limit(
                request.domain, request.descriptors, request.hits_addend, budget
            )
            over = answer.over
            (self._over if over else self._ok).inc()
            latency = perf_counter() - started
            domain = request.domain if answer.note != "unknown-domain" else UNKNOWN_POLICY_LABEL
            self._durations.get(domain).observe(latency)
            decisions = self._decisions
            if decisions is not None and (over or decisions.everything):
                decisions.record(self._record(request, answer, domain, latency, span))
            if span is not None:
                span.finish(self._attributes(request, answer, domain))
            answered = True
            self._handled_ok.inc()
            return encode_response(answer)
        finally:
            if not answered:  # cancelled (Envoy gave up) or a bug: no answer went out
                self._handled("CANCELLED").inc()
                if span is not None:
                    span.finish({}, grpc_code=1, error="cancelled")

    def _record(
        self, request: Any, answer: Answer, domain: str, latency: float, span: RpcSpan | None
    ) -> DecisionRecord:
        decisions = self._decisions
        assert decisions is not None
        over = [s.limit for s in answer.statuses if s.over and s.limit is not None]
        detail = [("descriptors", _descriptors_text(request.descriptors, self._log_values))]
        if request.domain != domain:
            detail.append(("domain", bounded(printable(request.domain), 128)))
        return DecisionRecord(
            decisions.clock(), "ratelimit", domain, "over_limit" if answer.over else "ok",
            429 if answer.over else 0, bounded(", ".join(limit.label for limit in over)),
            answer.note, latency, trace_id=span.trace_id if span is not None else "",
            detail=tuple(detail), worker=decisions.worker,
        )

    def _attributes(self, request: Any, answer: Answer, domain: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "extsvc.ratelimit.domain": domain,
            "extsvc.ratelimit.outcome": "over_limit" if answer.over else "ok",
            "extsvc.ratelimit.descriptors": _descriptors_text(
                request.descriptors, self._span_values
            ),
        }
        over = [s.limit.label for s in answer.statuses if s.over and s.limit is not None]
        if over:
            attributes["extsvc.ratelimit.over_limits"] = over
        if answer.note:
            attributes["extsvc.ratelimit.note"] = answer.note
        return attributes

    def _fail(
        self, context: Any, code: grpc.StatusCode, details: str, domain: str, started: float,
        span: RpcSpan | None,
    ) -> bytes:
        """End the RPC with ``code``: set on the context and returned from, not raised with
        ``context.abort()``, whose exception keeps the call and its messages alive through its
        traceback until a full garbage collection."""
        self._error.inc()
        self._handled(code.name).inc()
        latency = perf_counter() - started
        if self._decisions is not None:
            self._decisions.record(DecisionRecord(
                self._decisions.clock(), "ratelimit", "", "error", 0, "", details, latency,
                detail=(("grpc_code", code.name),) + (
                    (("domain", bounded(printable(domain), 128)),) if domain else ()
                ),
                worker=self._decisions.worker,
            ))
        if span is not None:
            span.finish({"extsvc.ratelimit.outcome": "error"}, grpc_code=code.value[0],
                        error=details)
        context.set_code(code)
        context.set_details(details)
        return b""

    def _handled(self, code: str) -> Any:
        child = self._handled_by_code.get(code)
        if child is None:
            child = self._handled_by_code[code] = self._metrics.hot(
                self._metrics.grpc_handled.labels("ratelimit", "ShouldRateLimit", code)
            )
        return child


def _descriptors_text(descriptors: Any, values: bool) -> str:
    """Descriptors as ``k1=v1,k2=v2; k3`` (values only when asked), bounded."""
    return bounded("; ".join(
        ",".join(f"{k}={v}" if values else k for k, v in d.entries) for d in descriptors
    ))


def add_to_server(service: RateLimitService, server: Any) -> None:
    """Register ``service`` on ``server`` in its wire form: no (de)serializers, bytes both ways."""
    handler = grpc.unary_unary_rpc_method_handler(service.answer_wire)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ShouldRateLimit": handler}),)
    )
