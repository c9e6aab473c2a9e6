"""The thin gRPC adapter for ``envoy.service.ratelimit.v3.RateLimitService``.

Envoy -> convert -> limiter -> answer -> convert -> Envoy. Decisions travel in ``overall_code``
(docs/internals/envoy-behaviour.md §4.2); the RPC fails only when there is nothing to decide with
(no ``ratelimit`` config yet: UNAVAILABLE; no domain or no descriptors: INVALID_ARGUMENT), which
Envoy answers per its own ``failure_mode_deny``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.message import DecodeError

from extsvc.deadline import AnswerMargin
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics
from extsvc.ratelimit.convert import encode_response, parse_request
from extsvc.ratelimit.limiter import Limiter

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
    ) -> None:
        self._source = source
        #: what is kept back from the RPC's deadline to send the answer (see AnswerMargin)
        self._margin = AnswerMargin(deadline_margin_s, deadline_margin_ratio)
        self._default_timeout = default_timeout_s
        self._ok = metrics.hot(metrics.rl_responses.labels("ok"))
        self._over = metrics.hot(metrics.rl_responses.labels("over_limit"))
        self._error = metrics.hot(metrics.rl_responses.labels("error"))
        self._throttle = LogThrottle()

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        """The message form (in-process callers); the server registers :meth:`answer_wire`."""
        raw = await self.answer_wire(request.SerializeToString(), context)
        return RateLimitResponse.FromString(raw)

    async def answer_wire(self, raw: bytes, context: Any) -> bytes:
        """ShouldRateLimit from request bytes to response bytes (see convert.py's wire form)."""
        limiter = self._source.limiter
        if limiter is None:
            return self._fail(context, grpc.StatusCode.UNAVAILABLE, "no ratelimit config loaded")
        try:
            request = parse_request(raw)
        except DecodeError as exc:
            held = self._throttle.allow("unreadable")
            if held is not None:
                log.warning("unreadable RateLimitRequest answered INVALID_ARGUMENT: %s "
                            "(%d more since the last report)", exc, held)
            return self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, "unreadable RateLimitRequest")
        if not request.domain or not request.descriptors:
            return self._fail(
                context, grpc.StatusCode.INVALID_ARGUMENT,
                "rate limit domain must not be empty" if not request.domain
                else "rate limit descriptor list must not be empty",
            )
        budget = None
        if limiter.remote:  # only a store that waits needs the RPC's budget
            remaining = context.time_remaining()
            budget = self._default_timeout if remaining is None else self._margin.budget(remaining)
        answer = await limiter.should_rate_limit(
            request.domain, request.descriptors, request.hits_addend, budget
        )
        (self._over if answer.over else self._ok).inc()
        return encode_response(answer)

    def _fail(self, context: Any, code: grpc.StatusCode, details: str) -> bytes:
        """End the RPC with ``code``: set on the context and returned from, not raised with
        ``context.abort()``, whose exception keeps the call and its messages alive through its
        traceback until a full garbage collection."""
        self._error.inc()
        context.set_code(code)
        context.set_details(details)
        return b""


def add_to_server(service: RateLimitService, server: Any) -> None:
    """Register ``service`` on ``server`` in its wire form: no (de)serializers, bytes both ways."""
    handler = grpc.unary_unary_rpc_method_handler(service.answer_wire)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ShouldRateLimit": handler}),)
    )
