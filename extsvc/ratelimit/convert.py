"""RateLimitRequest -> the limiter's values -> RateLimitResponse (the only place using rls_pb2).

Two forms of each direction. The message form (:func:`to_descriptors`, :func:`to_response`) works
on protobuf objects. The wire form (:func:`parse_request`, :func:`encode_response`) is what the
server uses: the RPC is registered without (de)serializers, a request's bytes are looked up in a
cache of parsed requests (Envoy sends the same few descriptor sets over and over) and the answer is
encoded straight to bytes from per-limit pieces. Building and serializing upb messages, and
reading a parsed request's fields, cost more than the whole limiter for a 3-descriptor request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from extsvc.ratelimit.config import Limit
from extsvc.ratelimit.limiter import OK_NO_LIMIT, UNLIMITED, Answer, DescriptorRequest

_Request = rls_pb2.RateLimitRequest
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
        # docs/internals/envoy-behaviour.md §4.3: Envoy builds x-ratelimit-* from current_limit
        # (name -> ;name=)
        message.current_limit.CopyFrom(_current_limit(limit))
        message.duration_until_reset.seconds = status.reset_s
    if answer.headers:
        response.response_headers_to_add.extend(
            _HeaderValue(key=k, value=v) for k, v in answer.headers
        )
    if answer.body:
        response.raw_body = answer.body.encode()
    return response


# --- the wire form ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    domain: str
    descriptors: tuple[DescriptorRequest, ...]
    hits_addend: int


#: Parsed requests by their bytes, which determine them entirely. Bounded (descriptors carrying
#: client addresses vary); emptied when full.
_requests: dict[bytes, ParsedRequest] = {}
_REQUESTS_MAX = 10_000


def parse_request(raw: bytes) -> ParsedRequest:
    """The request in ``raw``. :raises google.protobuf.message.DecodeError: unreadable bytes."""
    parsed = _requests.get(raw)
    if parsed is None:
        request = _Request.FromString(raw)
        parsed = ParsedRequest(request.domain, tuple(to_descriptors(request)), request.hits_addend)
        if len(_requests) >= _REQUESTS_MAX:
            _requests.clear()
        _requests[raw] = parsed
    return parsed


def _field(message: Any, name: str, wire_type: int) -> int:
    """A field's tag byte, from the descriptor (so a renumbering would show here, not on the wire)."""
    tag = int(message.DESCRIPTOR.fields_by_name[name].number) << 3 | wire_type
    assert tag < 0x80, name
    return tag


_VARINT, _LEN = 0, 2
_T_OVERALL = bytes([_field(_Response, "overall_code", _VARINT)])
_T_STATUS = bytes([_field(_Response, "statuses", _LEN)])
_T_CODE = bytes([_field(_DescriptorStatus, "code", _VARINT)])
_T_LIMIT = bytes([_field(_DescriptorStatus, "current_limit", _LEN)])
_T_REMAINING = bytes([_field(_DescriptorStatus, "limit_remaining", _VARINT)])
_T_RESET = bytes([_field(_DescriptorStatus, "duration_until_reset", _LEN)])
_T_SECONDS = bytes([_field(_Response.DescriptorStatus().duration_until_reset, "seconds", _VARINT)])
#: varints below 128 are one byte; the table saves building them
_SMALL = [bytes([n]) for n in range(128)]


def _varint(value: int) -> bytes:
    # Unrolled up to 5 bytes (every uint32: limits, remaining counts, reset seconds).
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80,
                      value >> 21))
    if value < 0x800000000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80,
                      value >> 21 & 0x7F | 0x80, value >> 28))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _wrap(body: bytes) -> bytes:
    return _T_STATUS + _varint(len(body)) + body


_OVERALL = {False: _T_OVERALL + _varint(OK), True: _T_OVERALL + _varint(OVER_LIMIT)}
_CODE = {False: _T_CODE + _varint(OK), True: _T_CODE + _varint(OVER_LIMIT)}
_WIRE_OK = _wrap(_CODE[False])
_WIRE_OVER = _wrap(_CODE[True])
_EMPTY_RESET = _T_RESET + _SMALL[0]
_WIRE_UNLIMITED = _wrap(_CODE[False] + _T_REMAINING + _varint(UNLIMITED.remaining))

#: a limited status's leading bytes (code + current_limit) by (limit identity, over); bounded
_heads: dict[tuple[str, int, int, bool], bytes] = {}


def _head(limit: Limit, over: bool) -> bytes:
    ident = (limit.name, limit.requests_per_unit, limit.unit, over)
    head = _heads.get(ident)
    if head is None:
        current = _current_limit(limit).SerializeToString()
        head = _CODE[over] + _T_LIMIT + _varint(len(current)) + current
        if len(_heads) >= _CURRENT_LIMITS_MAX:
            _heads.clear()
        _heads[ident] = head
    return head


#: encoded duration_until_reset fields by seconds (a window's length bounds the distinct values)
_resets: dict[int, bytes] = {}


def _reset(seconds: int) -> bytes:
    # always present (empty for 0 s), as to_response sets it
    if seconds <= 0:
        encoded = _EMPTY_RESET
    else:
        field = _T_SECONDS + _varint(seconds)
        encoded = _T_RESET + _varint(len(field)) + field
    if len(_resets) >= 100_000:
        _resets.clear()
    _resets[seconds] = encoded
    return encoded


def encode_response(answer: Answer) -> bytes:
    """``to_response(answer).SerializeToString()``, the same message (tests hold them equal)."""
    parts = [_OVERALL[answer.over]]
    append = parts.append
    for status in answer.statuses:
        limit = status.limit
        if limit is None:
            if status is OK_NO_LIMIT:
                append(_WIRE_OK)
            elif status is UNLIMITED:
                append(_WIRE_UNLIMITED)
            elif status.over:
                append(_WIRE_OVER)
            elif status.remaining > 0:
                append(_wrap(_CODE[False] + _T_REMAINING + _varint(status.remaining)))
            else:
                append(_WIRE_OK)
            continue
        body = _head(limit, status.over)
        if status.remaining > 0:
            body += _T_REMAINING + _varint(status.remaining)
        reset = _resets.get(status.reset_s)
        if reset is None:
            reset = _reset(status.reset_s)
        body += reset
        append(_T_STATUS + (_SMALL[len(body)] if len(body) < 0x80 else _varint(len(body))) + body)
    if answer.headers or answer.body:
        # Serialized messages concatenate as a merge: these fields follow the statuses.
        extra = _Response()
        extra.response_headers_to_add.extend(_HeaderValue(key=k, value=v) for k, v in answer.headers)
        if answer.body:
            extra.raw_body = answer.body.encode()
        append(extra.SerializeToString())
    return b"".join(parts)
