"""The thin gRPC adapter for ``envoy.service.ext_proc.v3.ExternalProcessor``.

Reads each ``ProcessingRequest``, feeds it to the stream's state machine
(:mod:`extsvc.extproc.stream`) and writes what comes back. Returns when Envoy half-closes
(envoy-protocols.md §2.1, checklist item 1). Not ready (no config yet) and protocol violations
end the RPC with a gRPC error, so Envoy's ``failure_mode_allow`` / ``status_on_error`` decide.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extsvc.authz.service import call_authority
from extsvc.config.runtime import RuntimeHolder
from extsvc.extproc.model import HttpMessage
from extsvc.extproc.stream import ExtprocStream, ProtocolError
from extsvc.observability.logging import LogThrottle
from extsvc.observability.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessorService(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, holder: RuntimeHolder, metrics: Metrics) -> None:
        self._holder = holder
        self._metrics = metrics
        #: per-request failure warnings, once per cause and interval (the metrics count all)
        self._throttle = LogThrottle()
        self._not_ready = metrics.hot(metrics.extproc_streams.labels("", "not-ready"))
        self._active = metrics.hot(metrics.extproc_active_streams)
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}

    async def Process(self, request_iterator: Any, context: Any) -> None:
        runtime = self._holder.current
        if runtime is None:
            self._not_ready.inc()
            held = self._throttle.allow("not-ready")
            if held is not None:
                log.warning("ext_proc stream before the first config load: ending it with "
                            "UNAVAILABLE (%d more since the last report)", held)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "extsvc: no config loaded yet")
            return
        runtime.enter()
        self._active.inc()
        stream = ExtprocStream(runtime.extproc, authority=lambda: call_authority(context))
        outcome = "ok"
        between = True
        try:
            read, write, step = context.read, context.write, stream.step
            eof = grpc.aio.EOF
            while True:
                between = True
                request = await read()
                if request is eof:
                    break
                between = False
                answers: Any = step(request)
                if answers.__class__ is HttpMessage:  # the policy's processors run on it
                    answers = await stream.run(answers)
                elif stream.unknown_policy and stream.received == 1:
                    held = self._throttle.allow(f"policy:{stream.policy_name[:64]}")
                    if held is not None:
                        log.warning(
                            "ext_proc stream answered 500: %s (%d more since the last report) "
                            "[request_id=%s]",
                            f"unknown policy {stream.policy_name!r}" if stream.policy_name
                            else "no policy chosen and no extproc.default_policy",
                            held, stream.exchange.request_id,
                        )
                for response in answers:
                    await write(response)
        except ProtocolError as exc:
            outcome = "protocol-error"
            log.warning(
                "ext_proc protocol error (%s) on policy %s: %s", exc.reason, stream.policy_name or "-", exc
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"extsvc: {exc}")
        except asyncio.CancelledError:
            # Envoy reset the stream. Between messages that is how it ends some streams (after
            # the answer to a local reply's response headers, or when the client went away);
            # while a message was being processed it means the answer came too late.
            outcome = "reset" if between else "cancelled"
            raise
        finally:
            self._active.dec()
            # What the stream did wins over how Envoy ended it (half-close or reset).
            if outcome in ("ok", "reset"):
                if stream.unknown_policy:
                    outcome = "unknown-policy"
                elif stream.immediate_status is not None:
                    outcome = "immediate"
            children = self._children.get((stream.policy_name, outcome))
            if children is None:
                children = self._bind(stream.policy_name, outcome)
            streams, received, sent, overrides = children
            streams.inc()
            received.inc(stream.received)
            sent.inc(stream.sent)
            if stream.override_sent:
                overrides.inc()
            runtime.leave()

    def _bind(self, policy: str, outcome: str) -> tuple[Any, Any, Any, Any]:
        """The metric children of one (policy, outcome), bound once (``labels()`` is not free)."""
        name = policy[:64]
        m = self._metrics
        children = (
            m.hot(m.extproc_streams.labels(name, outcome)),
            m.hot(m.extproc_messages.labels(name, "received")),
            m.hot(m.extproc_messages.labels(name, "sent")),
            m.hot(m.extproc_mode_overrides.labels(name)),
        )
        if len(self._children) < 1024:  # policy names come from config, but bound the cache
            self._children[(policy, outcome)] = children
        return children
