"""The ext_proc stream with the caps of what a request may carry (docs/hardening.md).

Each header and trailer message is held against :class:`~extsvc.limits.RequestLimits` before
the stream (and anything in it: the policy choice, the processors, a log line's request id) can
decode it. One over a cap is answered with an immediate response -- 431 for request headers or
trailers, 502 for the upstream's response headers or trailers, as Envoy answers its own header
limits -- and the stream ends (Envoy ignores the stream after an immediate response). It is not
the policy's ``on_error`` path: ``continue`` there would send the request on without the
processors that could not read it.

Body messages are not held here: each is one gRPC message (bounded by ``max_message_bytes``) and
the stream keeps none of them; a processor that collects a body bounds its own (``json-redact``'s
``max_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from extsvc.extproc import convert
from extsvc.extproc.model import HttpMessage, ImmediateReply
from extsvc.extproc.stream import ExtprocStream
from extsvc.limits import Overflow, Rejections, RequestLimits

if TYPE_CHECKING:
    from extsvc.extproc.pipeline import ExtprocPolicies

#: the immediate response's status by over-cap message: the client's (431) or the upstream's (502)
_STATUS = {
    "request_headers": 431,
    "request_trailers": 431,
    "response_headers": 502,
    "response_trailers": 502,
}


class GuardedStream(ExtprocStream):
    """An :class:`ExtprocStream` that refuses header and trailer messages over the caps."""

    def __init__(
        self,
        policies: ExtprocPolicies | None,
        limits: RequestLimits,
        rejections: Rejections,
        *,
        authority: Callable[[], str] = str,
        **kwargs: Any,
    ) -> None:
        super().__init__(policies, authority=authority, **kwargs)
        self._limits = limits
        self._rejections = rejections

    def step(self, request: Any) -> list[Any] | HttpMessage:
        which = request.WhichOneof("request")
        status = _STATUS.get(which) if which is not None else None
        if status is not None and not self.finished:
            inner = getattr(request, which)
            header_map = inner.trailers if which.endswith("trailers") else inner.headers
            overflow = convert.header_overflow(header_map, self._limits, which)
            if overflow is not None:
                return self._refuse(request, which, status, overflow)
        return ExtprocStream.step(self, request)

    def _refuse(self, request: Any, which: str, status: int, overflow: Overflow) -> list[Any]:
        self.received += 1
        self.finished = True
        exchange = self.exchange
        request_id = (  # the request headers, when they were under the caps (and not this message)
            exchange.request_id if which != "request_headers" and exchange._raw_request_headers else ""
        )
        self._rejections.record(overflow, str(status), self.policy_name, request_id)
        details = f"extsvc_{overflow.reason.replace('-', '_')}_over_limit"  # header_count_over_limit
        reply = ImmediateReply(status, b"", {}, details, None)
        if request.observability_mode:  # Envoy would not read an answer
            self.immediate_status = status
            return []
        return self._emit(convert.immediate(reply), status)
