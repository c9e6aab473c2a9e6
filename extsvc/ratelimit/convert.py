"""RateLimitRequest -> the limiter's values -> RateLimitResponse (the only place using rls_pb2)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from extsvc.ratelimit.config import Limit
from extsvc.ratelimit.limiter import OK_NO_LIMIT, UNLIMITED, Answer, DescriptorRequest

_Response = rls_pb2.RateLimitResponse
_DescriptorStatus = _Response.DescriptorStatus
_RateLimit = _Response.RateLimit
_HeaderValue = base_pb2.HeaderValue
OK = _Response.OK
OVER_LIMIT = _Response.OVER_LIMIT

_STATUS_OK = _DescriptorStatus(code=OK)
_STATUS_UNLIMITED = _DescriptorStatus(code=OK, limit_remaining=UNLIMITED.remaining)
_STATUS_OVER = _DescriptorStatus(code=OVER_LIMIT)


#: Converted descriptors by their serialized form, which determines them entirely (entries,
#: ``limit``, ``hits_addend``): reading a descriptor's entries through upb costs several times
#: more than serializing it. Bounded (values such as client addresses vary); emptied when full.
_descriptors: dict[bytes, DescriptorRequest] = {}
_DESCRIPTORS_MAX = 10_000


def _convert(d: Any) -> DescriptorRequest:
    entries = tuple([(e.key, e.value) for e in d.entries])
    override = (d.limit.requests_per_unit, d.limit.unit) if d.HasField("limit") else None
    hits = d.hits_addend.value if d.HasField("hits_addend") else None
    return DescriptorRequest(entries, override, hits)


def to_descriptors(request: Any) -> list[DescriptorRequest]:
    """The request's descriptors; Envoy's per-descriptor ``limit`` and ``hits_addend`` kept."""
    out = []
    for d in request.descriptors:
        raw = d.SerializeToString()
        converted = _descriptors.get(raw)
        if converted is None:
            if len(_descriptors) >= _DESCRIPTORS_MAX:
                _descriptors.clear()
            converted = _descriptors[raw] = _convert(d)
        out.append(converted)
    return out


#: ``current_limit`` messages by (name, requests_per_unit, unit), copied into each status
#: (cheaper than building one per status); bounded because overrides come from requests.
_current_limits: dict[tuple[str, int, int], Any] = {}
_CURRENT_LIMITS_MAX = 4096


def _current_limit(limit: Limit) -> Any:
    ident = (limit.name, limit.requests_per_unit, limit.unit)
    message = _current_limits.get(ident)
    if message is None:
        if len(_current_limits) >= _CURRENT_LIMITS_MAX:
            _current_limits.clear()
        message = _current_limits[ident] = _RateLimit(
            name=limit.name, requests_per_unit=limit.requests_per_unit, unit=limit.unit
        )
    return message


def to_response(answer: Answer) -> Any:
    response = _Response(overall_code=OVER_LIMIT if answer.over else OK)
    statuses = response.statuses
    add = statuses.add
    for status in answer.statuses:
        limit = status.limit
        if limit is None:
            if status is OK_NO_LIMIT:
                statuses.append(_STATUS_OK)
            elif status is UNLIMITED:
                statuses.append(_STATUS_UNLIMITED)
            elif status.over:
                statuses.append(_STATUS_OVER)
            else:
                add(code=OK, limit_remaining=status.remaining)
            continue
        # Filled in place: building the status (and its submessages) first and then appending
        # copies it again.
        message = add(code=OVER_LIMIT if status.over else OK, limit_remaining=status.remaining)
        # envoy-protocols.md §3.3: Envoy builds x-ratelimit-* from current_limit (name -> ;name=)
        message.current_limit.CopyFrom(_current_limit(limit))
        message.duration_until_reset.seconds = status.reset_s
    if answer.headers:
        response.response_headers_to_add.extend(
            _HeaderValue(key=k, value=v) for k, v in answer.headers
        )
    if answer.body:
        response.raw_body = answer.body.encode()
    return response
