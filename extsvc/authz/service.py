"""The thin gRPC adapter for ``envoy.service.auth.v3.Authorization``.

Envoy -> convert -> compiled policy -> decision -> convert -> Envoy. The RPC always completes with
gRPC OK; denials and internal failures travel inside the CheckResponse (envoy-protocols.md §1.6).
"""

from __future__ import annotations

import logging
from asyncio import get_running_loop
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2_grpc

from extsvc.authz.convert import bind_policy, to_check_context, to_check_response
from extsvc.authz.model import Decision
from extsvc.config.runtime import RuntimeHolder
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
#: gRPC metadata key carrying the authority when grpcio cannot expose ``:authority`` itself.
AUTHORITY_METADATA_KEY = "x-extsvc-authority"

# Not ready yet: an error_response without a status, so Envoy applies its own status_on_error /
# failure_mode_allow exactly as if the server were down.
_NOT_READY = to_check_response(
    Decision.deny(503, grpc_code=14, reason="no config loaded yet"), envoy_error=True
)
_BAD_REQUEST = to_check_response(Decision.deny(400, "bad request", grpc_code=3))
_UNKNOWN_POLICY = to_check_response(Decision.deny(403, grpc_code=7))


def call_authority(context: Any) -> str:
    """The ``:authority`` of the gRPC call (``GatewayExtension.grpcService.authority``).

    grpcio 1.85's asyncio server does not expose ``:authority`` (grpc/grpc#38906); newer releases
    add an accessor, used when present. Until then the value is read from the ``x-extsvc-authority``
    metadata that the Envoy config can send with ``grpc_service.initial_metadata``.
    """
    kind = type(context)
    try:
        name = _AUTHORITY_ACCESSOR[kind]
    except KeyError:  # once per context class: a missing attribute costs a raised AttributeError
        name = next((n for n in ("experimental_authority", "authority") if hasattr(kind, n)), None)
        _AUTHORITY_ACCESSOR[kind] = name
    if name is not None:
        value = getattr(context, name)()
        if value:
            return value.decode() if isinstance(value, bytes) else str(value)
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORITY_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


#: per servicer-context class, the name of its ``:authority`` accessor (None: it has none)
_AUTHORITY_ACCESSOR: dict[type, str | None] = {}


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        *,
        deadline_margin_s: float = 0.005,
        default_timeout_s: float = 1.0,
    ) -> None:
        self._holder = holder
        self._metrics = metrics
        #: per-request failure warnings, once per cause and interval (the metrics count all)
        self._throttle = LogThrottle()
        self._margin = deadline_margin_s
        self._default_timeout = default_timeout_s
        self._not_ready = metrics.hot(metrics.authz_decisions.labels("", "error"))

    async def Check(self, request: Any, context: Any) -> Any:
        # One frame for the whole RPC (no helper coroutine): this runs for every request.
        runtime = self._holder.current
        if runtime is None:
            self._not_ready.inc()
            held = self._throttle.allow("not-ready")
            if held is not None:
                log.warning("Check before the first config load: answering as an error "
                            "(%d more since the last report)", held)
            return _NOT_READY
        runtime.enter()
        try:
            remaining = context.time_remaining()
            budget = self._default_timeout if remaining is None else remaining - self._margin
            deadline = get_running_loop().time() + (budget if budget > 0.0 else 0.0)
            try:
                check = to_check_context(request)
            except Exception as exc:  # noqa: BLE001 (malformed input is denied, never crashes)
                self._metrics.bad_requests.inc()
                log.warning("unreadable CheckRequest denied with 400: %r", exc)
                return _BAD_REQUEST

            if runtime.authority_matters:
                name, policy = runtime.select(check.context_extensions, lambda: call_authority(context))
            else:  # no policy the authority could pick differs from the default: skip reading it
                name, policy = runtime.select(check.context_extensions, "")
            if policy is None:
                return self._unknown_policy(name, check)

            bind_policy(check, name)
            try:
                outcome = await policy.evaluate(check, deadline)
            except Exception:  # a bug of ours still gets a policy answer, never an aborted RPC
                log.exception("policy %s failed outside any step [request_id=%s]", name,
                              check.request_id)
                outcome = policy.internal_error(check)
            policy.counters[outcome.label].inc()
            if log.isEnabledFor(logging.DEBUG):
                decision = outcome.decision
                log.debug(
                    "%s %s %s -> %s %s by %s (%s) [request_id=%s]",
                    name, check.method, check.path, outcome.label,
                    decision.status, outcome.step or "default", decision.reason, check.request_id,
                    extra={"request_id": check.request_id},
                )
            return to_check_response(outcome.decision, envoy_error=outcome.envoy_error)
        finally:
            runtime.leave()

    def _unknown_policy(self, name: str, check: Any) -> Any:
        label = name[:64]
        self._metrics.unknown_policy.labels(label).inc()
        self._metrics.authz_decisions.labels(label, "deny").inc()
        held = self._throttle.allow(f"policy:{label}")
        if held is not None:
            log.warning(
                "denied: %s (%d more since the last report) [request_id=%s]",
                f"unknown policy {name!r}" if name else "no policy chosen and no default_policy",
                held, check.request_id,
                extra={"request_id": check.request_id},
            )
        return _UNKNOWN_POLICY
