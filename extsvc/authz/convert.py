"""ext_authz protobufs <-> the project's value objects. The only module importing them.

§ references are to docs/internals/envoy-behaviour.md (§2: ext_authz, §1.4: ``append``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from extsvc.authz.pipeline import CompiledPolicy, Outcome
from extsvc.limits import Overflow, Rejections, RequestLimits, over_header_caps
from extsvc.plugin.check import CheckContext, Decision, Peer, ResponseHeaderAction

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"

_APPEND_ACTIONS = {
    ResponseHeaderAction.APPEND: base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD,
    ResponseHeaderAction.ADD_IF_ABSENT: base_pb2.HeaderValueOption.ADD_IF_ABSENT,
    ResponseHeaderAction.OVERWRITE_IF_EXISTS: base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS,
    ResponseHeaderAction.OVERWRITE: base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
}


_NO_LIMITS = RequestLimits()


def to_check_context(request: Any, limits: RequestLimits = _NO_LIMITS) -> EnvoyCheckContext:
    """A :class:`CheckContext` over a CheckRequest; each field is read on first access.

    The request is held against ``limits`` first (one ``ByteSize()`` for the common request):
    one over a cap gets a context whose ``over_limit`` says which, and whose headers read as
    empty, so that nothing decodes what it carries. See :func:`rejected_outcome`.
    """
    check = EnvoyCheckContext(request.attributes)
    http = check._http
    size = http.ByteSize()
    if size > limits.quick_bytes:
        overflow = _over_limits(http, size, limits)
        if overflow is not None:
            check.over_limit = overflow
            check._headers = _EMPTY
    return check


def _over_limits(http: Any, size: int, limits: RequestLimits) -> Overflow | None:
    """The cap ``http`` (an AttributeContext.HttpRequest of ``size`` bytes serialized) is over, if
    any. Each count runs only when the cheaper ones cannot rule the cap out, and the header count
    (checked first) bounds the loop adding up the header bytes."""
    count = len(http.headers) + len(http.header_map.headers)
    header_bytes = -1
    if count <= limits.max_headers and size > limits.max_header_bytes:
        header_bytes = sum(len(name) + len(value) for name, value in http.headers.items())
        for header in http.header_map.headers:
            header_bytes += len(header.key) + (len(header.raw_value) or len(header.value.encode()))
    overflow = over_header_caps(count, header_bytes, limits, "Check")
    if overflow is not None or size <= limits.max_body_bytes:
        return overflow
    body = len(http.raw_body) or len(http.body.encode())
    if body > limits.max_body_bytes:
        return Overflow(
            "body-bytes",
            f"Check: a body of {body:,} bytes, over max_request_body_bytes={limits.max_body_bytes:,}",
        )
    return None


def rejected_outcome(policy: CompiledPolicy, check: EnvoyCheckContext, rejections: Rejections) -> Outcome:
    """The answer to a Check over a cap (``check.over_limit``): the policy's ``error_reply``.

    Never an allow, and never an ``error_response`` either (with which Envoy's
    ``failure_mode_allow`` could let the request through), whatever the policy's ``on_error``:
    a request over a cap is refused, not a failure of extsvc. Counted and logged.
    """
    overflow = check.over_limit
    assert overflow is not None
    request_id = str(check._http.headers.get("x-request-id", ""))  # the map: no decoding
    rejections.record(overflow, f"{policy.error_decision.status} (error_reply)", policy.name, request_id)
    decision = policy.error_decision.with_reason(f"request over a cap: {overflow.message}")
    return Outcome(decision, "error")


class EnvoyCheckContext(CheckContext):
    """The lazy CheckContext: a step pays only for the fields it reads (most read two or three).

    Unset slots raise AttributeError, which doubles as "not computed yet" -- except for those
    read by most requests (``headers``, ``context_extensions``, ``path``/``query``), which start
    as None: a raised and caught AttributeError costs more than the slot assignment.

    :ivar over_limit: the cap of :class:`~extsvc.limits.RequestLimits` the request is over
        (``None``: under all of them); see :func:`to_check_context`.
    """

    __slots__ = ("_attrs", "_http", "over_limit")

    def __init__(self, attrs: Any) -> None:
        self._attrs = attrs
        self._http = attrs.request.http
        self._policy = ""
        self._headers = None  # type: ignore[assignment]
        self._context_extensions = None  # type: ignore[assignment]
        self._path = None  # type: ignore[assignment]
        self.over_limit: Overflow | None = None

    @property
    def method(self) -> str:
        return str(self._http.method or self.headers.get(":method", ""))

    def _split(self) -> None:
        raw = self._http.path or self.headers.get(":path", "")
        path, _, query = raw.partition("?")
        self._path = path.partition("#")[0] or "/"
        self._query = query.partition("#")[0]

    @property
    def path(self) -> str:
        if self._path is None:
            self._split()
        return self._path

    @property
    def query(self) -> str:
        if self._path is None:  # _split() sets both
            self._split()
        return self._query

    @property
    def host(self) -> str:
        return str(self._http.host or self.headers.get(":authority", ""))

    @property
    def scheme(self) -> str:
        return str(self._http.scheme or self.headers.get(":scheme", ""))

    @property
    def protocol(self) -> str:
        return str(self._http.protocol)

    @property
    def headers(self) -> Mapping[str, str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = _headers(self._http)
        return headers

    @property
    def body(self) -> bytes | None:
        try:
            return self._body
        except AttributeError:
            http = self._http
            self._body = http.raw_body or (http.body.encode("utf-8") if http.body else None)
            return self._body

    @property
    def body_truncated(self) -> bool:
        return self.headers.get(_PARTIAL_BODY_HEADER) == "true"

    @property
    def source(self) -> Peer:
        try:
            return self._source
        except AttributeError:
            self._source = _peer(self._attrs.source)
            return self._source

    @property
    def destination(self) -> Peer:
        try:
            return self._destination
        except AttributeError:
            self._destination = _peer(self._attrs.destination)
            return self._destination

    @property
    def tls_sni(self) -> str:
        return str(self._attrs.tls_session.sni)

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def header(self, name: str) -> str | None:
        """One header (a lower-case name), read from the request's map without decoding all
        of it when no step has (the decision log reads a few per request)."""
        headers = self._headers
        if headers is not None:
            return headers.get(name)
        http = self._http
        if http.headers or not http.header_map.headers:
            value = http.headers.get(name)
            return None if value is None else str(value)
        return self.headers.get(name)  # encode_raw_headers: only the list form is sent

    @property
    def source_address(self) -> str:
        """The downstream address, without decoding the rest of :attr:`source`."""
        return str(self._attrs.source.address.socket_address.address)

    @property
    def stream_id(self) -> str:
        return str(self._http.id)

    @property
    def context_extensions(self) -> Mapping[str, str]:
        extensions = self._context_extensions
        if extensions is None:
            ext = self._attrs.context_extensions
            extensions = self._context_extensions = MappingProxyType(dict(ext)) if ext else _EMPTY
        return extensions

    @property
    def metadata(self) -> Mapping[str, Any]:
        try:
            return self._metadata
        except AttributeError:
            attrs = self._attrs
            self._metadata = (
                _filter_metadata(attrs.metadata_context)
                if attrs.HasField("metadata_context") else _EMPTY
            )
            return self._metadata

    @property
    def route_metadata(self) -> Mapping[str, Any]:
        try:
            return self._route_metadata
        except AttributeError:
            attrs = self._attrs
            self._route_metadata = (
                _filter_metadata(attrs.route_metadata_context)
                if attrs.HasField("route_metadata_context") else _EMPTY
            )
            return self._route_metadata

    @property
    def policy(self) -> str:
        return self._policy

    def bind(self, policy: str) -> None:
        """Record the name of the policy chosen for this request (read back as ``policy``).

        The policy is chosen from ``context_extensions`` of this very view, so it is only known
        after the view is built.
        """
        self._policy = policy


def _headers(http: Any) -> Mapping[str, str]:
    # docs/internals/envoy-behaviour.md §2.1: `headers` (map, lower-case, duplicates comma-joined) unless
    # encode_raw_headers is on,
    # then `header_map` with raw values and no joining -- join them here so plugins see one shape.
    if http.HasField("header_map") and len(http.header_map.headers):
        joined: dict[str, str] = {}
        # A repeated name's values are collected and joined once: joining as they came copied
        # the whole value for every repeat (quadratic: 800k repeats held the loop for 15 s).
        repeated: dict[str, list[str]] | None = None
        for header in http.header_map.headers:
            name = header.key.lower()
            value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
            if name in joined:
                if repeated is None:
                    repeated = {}
                values = repeated.get(name)
                if values is None:
                    repeated[name] = [joined[name], value]
                else:
                    values.append(value)
            else:
                joined[name] = value
        if repeated is not None:
            for name, values in repeated.items():
                joined[name] = ",".join(values)
        return MappingProxyType(joined)
    # The protobuf map itself, read-only behind a view: no copy per request.
    return _HeaderView(http.headers)


class _HeaderView(Mapping[str, str]):
    """A read-only view of the protobuf ``headers`` map.

    Not a MappingProxyType: indexing a protobuf map with a missing key *inserts* it, so
    ``headers["x"]`` returned ``""`` instead of raising KeyError and ``"x" in headers`` was true
    for every later step of the policy.
    """

    __slots__ = ("_map",)

    def __init__(self, proto_map: Any) -> None:
        self._map = proto_map

    def __getitem__(self, key: str) -> str:
        if key in self._map:
            return str(self._map[key])
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:  # no insert, one lookup
        return self._map.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return repr(dict(self._map))


_NO_PEER = Peer()


def _peer(peer: Any) -> Peer:
    socket = peer.address.socket_address
    address = socket.address
    principal = peer.principal
    if not (address or principal or peer.service):
        return _NO_PEER
    if not (principal or peer.certificate or peer.service or peer.labels):  # plaintext: common
        return Peer(address, socket.port_value)
    return Peer(
        address=address,
        port=socket.port_value,
        principal=principal,
        certificate=peer.certificate,
        service=peer.service,
        labels=MappingProxyType(dict(peer.labels)) if peer.labels else _EMPTY,
    )


def _filter_metadata(metadata: Any) -> Mapping[str, Any]:
    if not metadata.filter_metadata:
        return _EMPTY
    return MappingProxyType(
        {ns: struct_to_python(value) for ns, value in metadata.filter_metadata.items()}
    )


def struct_to_python(value: Any) -> Any:
    """A protobuf Struct / Value / ListValue as plain Python (dict, list, str, float, bool, None)."""
    if isinstance(value, struct_pb2.Struct):
        return {k: struct_to_python(v) for k, v in value.fields.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [struct_to_python(v) for v in value.values]
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return struct_to_python(value.list_value)
    if kind == "null_value" or kind is None:
        return None
    return getattr(value, kind)


def python_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(data))
    return struct


class AnswerCache:
    """The CheckResponses built for recent decisions, keyed by the decision's identity.

    Steps hand back the same :class:`Decision` objects over and over (a fixed denial, a cached
    token's allow, a policy's default reply, the memoized merge of two of them), so their
    answer is encoded once and then reused. Decisions stay plain value objects: the memo lives
    here, beside the only code that builds protobuf.

    Each entry holds its decision, so the id it is filed under cannot be reused while it is
    kept. Bounded: past ``max_entries`` the oldest entry goes (a decision built per request
    passes through and is forgotten). An ``error_response`` (``on_error: envoy``) is filed apart
    from the same decision's denial.
    """

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._entries: dict[Any, tuple[Decision, Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def response(self, decision: Decision, envoy_error: bool = False) -> Any:
        """The CheckResponse of ``decision``: remembered, or built now and remembered."""
        key: Any = (id(decision), True) if envoy_error else id(decision)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is decision:
            return entry[1]
        response = _build_response(decision, envoy_error=envoy_error)
        entries = self._entries
        if len(entries) >= self._max:
            del entries[next(iter(entries))]
        entries[key] = (decision, response)
        return response

    def clear(self) -> None:
        self._entries.clear()


#: the converter's memo of answers (one event loop per process: no lock needed)
ANSWERS = AnswerCache()


def to_check_response(decision: Decision, *, envoy_error: bool = False) -> Any:
    """A :class:`Decision` as the CheckResponse Envoy acts on (docs/internals/envoy-behaviour.md §2.2).

    Answers are remembered in :data:`ANSWERS` by the decision's identity, so constant decisions
    -- a step's fixed denial, a cached token's allow -- are encoded once, not per request. The
    returned message is shared: do not modify it.
    """
    return ANSWERS.response(decision, envoy_error)


def _build_response(decision: Decision, *, envoy_error: bool) -> Any:
    if decision.allowed:
        return _ok_response(decision)
    # docs/internals/envoy-behaviour.md §2.2: deny with a non-zero status.code, never by aborting the RPC.
    response = CheckResponse(status=status_pb2.Status(code=decision.grpc_code or 7))
    reply = response.error_response if envoy_error else response.denied_response
    # An empty error_response must still be sent: without it Envoy sees a plain denial (403) and
    # never applies status_on_error / failure_mode_allow (docs/internals/envoy-behaviour.md §2.2).
    reply.SetInParent()
    if not envoy_error:  # unset error_response.status -> Envoy's status_on_error
        reply.status.code = decision.status
    if decision.body:
        reply.body = decision.body
    for name, value in decision.headers:
        # docs/internals/envoy-behaviour.md §1.4: on local replies leave `append` unset (append: true headers
        # are dropped).
        reply.headers.add().header.CopyFrom(base_pb2.HeaderValue(key=name, value=value))
    return response


def _ok_response(decision: Decision) -> Any:
    response = CheckResponse(status=status_pb2.Status(code=0))
    ok = response.ok_response
    ok.SetInParent()
    # docs/internals/envoy-behaviour.md §1.4: for request headers only the `append` bool counts in Envoy 1.40:
    # false = overwrite or add; true = comma-append, and only if the header exists.
    for name, value in decision.upstream_set:
        option = ok.headers.add()
        option.header.key = name
        option.header.value = value
        option.append.value = False
    for name, value in decision.upstream_append:
        option = ok.headers.add()
        option.header.key = name
        option.header.value = value
        option.append.value = True
    if decision.upstream_remove:
        ok.headers_to_remove.extend(decision.upstream_remove)
    for header in decision.response_headers:
        option = ok.response_headers_to_add.add()
        option.header.key = header.name
        option.header.value = header.value
        option.append_action = _APPEND_ACTIONS[header.action]
    for key, value in decision.query_set:
        param = ok.query_parameters_to_set.add()
        param.key = key
        param.value = value
    if decision.query_remove:
        ok.query_parameters_to_remove.extend(decision.query_remove)
    if decision.metadata:
        # The outer dynamic_metadata, not the deprecated ok_response one (it would replace it):
        # docs/internals/envoy-behaviour.md §2.2.
        response.dynamic_metadata.CopyFrom(python_to_struct(decision.metadata))
    return response
