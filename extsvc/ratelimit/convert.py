"""RateLimitRequest -> the limiter's values -> RateLimitResponse (the only place using rls_pb2)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from extsvc.ratelimit.limiter import OK_NO_LIMIT, UNLIMITED, Answer, DescriptorRequest, Status

_Response = rls_pb2.RateLimitResponse
_DescriptorStatus = _Response.DescriptorStatus
_RateLimit = _Response.RateLimit
_Duration = duration_pb2.Duration
_HeaderValue = base_pb2.HeaderValue
OK = _Response.OK
OVER_LIMIT = _Response.OVER_LIMIT

_STATUS_OK = _DescriptorStatus(code=OK)
_STATUS_UNLIMITED = _DescriptorStatus(code=OK, limit_remaining=UNLIMITED.remaining)
_STATUS_OVER = _DescriptorStatus(code=OVER_LIMIT)


def to_descriptors(request: Any) -> list[DescriptorRequest]:
    """The request's descriptors; Envoy's per-descriptor ``limit`` and ``hits_addend`` kept."""
    out = []
    for d in request.descriptors:
        entries = tuple((e.key, e.value) for e in d.entries)
        override = (d.limit.requests_per_unit, d.limit.unit) if d.HasField("limit") else None
        hits = d.hits_addend.value if d.HasField("hits_addend") else None
        if override is None and hits is None:
            out.append(DescriptorRequest(entries))
        else:
            out.append(DescriptorRequest(entries, override, hits))
    return out


def _status(status: Status) -> Any:
    limit = status.limit
    if limit is None:
        if status is OK_NO_LIMIT:
            return _STATUS_OK
        if status is UNLIMITED:
            return _STATUS_UNLIMITED
        return _STATUS_OVER if status.over else _DescriptorStatus(
            code=OK, limit_remaining=status.remaining
        )
    return _DescriptorStatus(
        code=OVER_LIMIT if status.over else OK,
        # envoy-protocols.md §3.3: Envoy builds x-ratelimit-* from current_limit (name -> ;name=)
        current_limit=_RateLimit(
            name=limit.name, requests_per_unit=limit.requests_per_unit, unit=limit.unit
        ),
        limit_remaining=status.remaining,
        duration_until_reset=_Duration(seconds=status.reset_s),
    )


def to_response(answer: Answer) -> Any:
    response = _Response(
        overall_code=OVER_LIMIT if answer.over else OK,
        statuses=[_status(s) for s in answer.statuses],
    )
    if answer.headers:
        response.response_headers_to_add.extend(
            _HeaderValue(key=k, value=v) for k, v in answer.headers
        )
    if answer.body:
        response.raw_body = answer.body.encode()
    return response
