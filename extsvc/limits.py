"""Caps on what one request may carry, and how a request over one is counted and logged.

The caps are process settings (``max_request_headers``, ``max_request_header_bytes``,
``max_request_body_bytes``), checked once per ext_authz Check and per ext_proc header or trailer
message before anything decodes the headers: :mod:`extsvc.authz.convert` and
:mod:`extsvc.extproc.convert` hold the checks, docs/hardening.md ("What a request may carry") says
what is answered. A request over a cap is counted in ``extsvc_request_rejected_total{service,
reason}`` and logged (once per reason and 10 s, with how many were held back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from extsvc.observability.logging import LogThrottle

if TYPE_CHECKING:
    from extsvc.observability.metrics import Metrics
    from extsvc.settings import Settings

log = logging.getLogger(__name__)

#: the ``reason`` label values of ``extsvc_request_rejected_total`` (a fixed set)
REASONS = ("header-count", "header-bytes", "body-bytes")

#: Every header of a serialized HeaderMap / map<string, string> takes at least two bytes (its
#: field tag and length), so a message of at most ``2 * n`` bytes cannot carry more than n headers.
_MIN_BYTES_PER_HEADER = 2


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The caps; the defaults are the settings' defaults (see docs/hardening.md for why)."""

    max_headers: int = 1000
    max_header_bytes: int = 256 * 1024
    max_body_bytes: int = 16 * 1024 * 1024
    #: a message whose serialized size is at most this is under every cap: one C call
    #: (``ByteSize()``) clears the common request, the exact counts run only above it
    quick_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        quick = min(self.max_header_bytes, self.max_body_bytes, _MIN_BYTES_PER_HEADER * self.max_headers)
        object.__setattr__(self, "quick_bytes", quick)

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        body = settings.max_request_body_bytes
        return cls(
            max_headers=settings.max_request_headers,
            max_header_bytes=settings.max_request_header_bytes,
            max_body_bytes=settings.max_message_bytes if body is None else body,
        )


class Overflow(NamedTuple):
    """Which cap a request is over (``reason``, one of :data:`REASONS`) and a sentence saying so."""

    reason: str
    message: str


def over_header_caps(count: int, size: int, limits: RequestLimits, what: str) -> Overflow | None:
    """The header caps against a message's header ``count`` and ``size`` (bytes of names and
    values); ``size`` may be -1 when not computed (the caller knows it is under the cap)."""
    if count > limits.max_headers:
        return Overflow(
            "header-count",
            f"{what}: {count:,} headers, over max_request_headers={limits.max_headers:,}",
        )
    if size > limits.max_header_bytes:
        return Overflow(
            "header-bytes",
            f"{what}: {size:,} bytes of headers, over max_request_header_bytes="
            f"{limits.max_header_bytes:,}",
        )
    return None


class Rejections:
    """Counts (hot counters bound once) and logs (throttled) one service's requests over a cap."""

    def __init__(self, metrics: Metrics, service: str) -> None:
        self._service = service
        self._counters: dict[str, Any] = {
            reason: metrics.hot(metrics.request_rejected.labels(service, reason)) for reason in REASONS
        }
        self._throttle = LogThrottle()

    def record(self, overflow: Overflow, answer: str, policy: str, request_id: str = "") -> None:
        """Count one request over a cap; log it unless one was logged for this reason lately."""
        self._counters[overflow.reason].inc()
        held = self._throttle.allow(overflow.reason)
        if held is not None:
            log.warning(
                "%s request over a cap (%s): %s; answered %s, policy %s "
                "(%d more since the last report) [request_id=%s]",
                self._service, overflow.reason, overflow.message, answer, policy or "-", held,
                request_id, extra={"request_id": request_id},
            )
