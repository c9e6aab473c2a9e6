"""The thin gRPC adapter for ``envoy.service.ratelimit.v3.RateLimitService``.

Envoy -> convert -> limiter -> answer -> convert -> Envoy. Decisions travel in ``overall_code``
(envoy-protocols.md §3.6); the RPC fails only when there is nothing to decide with (no
``ratelimit`` config yet: UNAVAILABLE; no domain or no descriptors: INVALID_ARGUMENT), which Envoy
answers per its own ``failure_mode_deny``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc

from extsvc.observability.metrics import Metrics
from extsvc.ratelimit.convert import to_descriptors, to_response
from extsvc.ratelimit.manager import RateLimitManager

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        manager: RateLimitManager,
        metrics: Metrics,
        *,
        deadline_margin_s: float = 0.005,
        default_timeout_s: float = 1.0,
    ) -> None:
        self._manager = manager
        self._margin = deadline_margin_s
        self._default_timeout = default_timeout_s
        self._ok = metrics.hot(metrics.rl_responses.labels("ok"))
        self._over = metrics.hot(metrics.rl_responses.labels("over_limit"))
        self._error = metrics.hot(metrics.rl_responses.labels("error"))

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        limiter = self._manager.limiter
        if limiter is None:
            self._error.inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no ratelimit config loaded")
            return None  # abort raises; for the type checker
        if not request.domain or not request.descriptors:
            self._error.inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "rate limit domain must not be empty" if not request.domain
                else "rate limit descriptor list must not be empty",
            )
            return None
        remaining = context.time_remaining()
        budget = self._default_timeout if remaining is None else max(remaining - self._margin, 0.0)
        answer = await limiter.should_rate_limit(
            request.domain, to_descriptors(request), request.hits_addend, budget
        )
        (self._over if answer.over else self._ok).inc()
        return to_response(answer)
