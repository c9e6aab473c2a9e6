"""CheckRequest -> CheckContext and Decision -> CheckResponse (docs/internals/envoy-behaviour.md §2, §1.4)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2

from extsvc.authz.convert import (
    AnswerCache,
    python_to_struct,
    struct_to_python,
    to_check_context,
    to_check_response,
)
from extsvc.plugin.check import CheckContext, Decision, Peer, ResponseHeader, ResponseHeaderAction
from extsvc.testing import check_context, check_request

HVO = base_pb2.HeaderValueOption


def raw_request(**http: Any) -> Any:
    """A CheckRequest with only the given ``attributes.request.http`` fields."""
    request = external_auth_pb2.CheckRequest()
    for key, value in http.items():
        if key == "headers":
            request.attributes.request.http.headers.update(value)
        else:
            setattr(request.attributes.request.http, key, value)
    return request


def with_header_map(pairs: list[tuple[str, bytes | str]], **http: Any) -> Any:
    request = raw_request(**http)
    header_map = request.attributes.request.http.header_map
    for key, value in pairs:
        if isinstance(value, bytes):
            header_map.headers.add(key=key, raw_value=value)
        else:
            header_map.headers.add(key=key, value=value)
    return request


# -- headers -------------------------------------------------------------------------------------


def test_headers_map_is_read_with_pseudo_headers() -> None:
    ctx = check_context(
        "/orders?id=7", method="POST", headers={"X-Dup": "one,two", "content-type": "text/plain"}
    )
    headers = ctx.headers
    assert headers["x-dup"] == "one,two"
    assert headers[":method"] == "POST"
    assert headers[":path"] == "/orders?id=7"
    assert headers[":authority"] == "example.test"
    assert headers.get("content-type") == "text/plain"
    assert set(headers) == {
        ":authority", ":method", ":path", ":scheme", "x-request-id", "x-dup", "content-type",
    }
    assert len(headers) == 7


def test_a_missing_header_raises_key_error_and_is_not_added() -> None:
    ctx = check_context("/")
    with pytest.raises(KeyError):
        ctx.headers["authorization"]
    assert "authorization" not in ctx.headers
    assert ctx.headers.get("authorization") is None
    assert ctx.headers.get("authorization", "none") == "none"
    assert len(ctx.headers) == 5


def test_headers_are_read_only() -> None:
    ctx = check_context("/", headers={"x-a": "1"})
    with pytest.raises(TypeError):
        ctx.headers["x-a"] = "2"  # type: ignore[index]


def test_header_map_duplicates_are_joined_with_a_comma() -> None:
    request = with_header_map(
        [
            (":path", b"/h"),
            ("X-Dup", b"one"),
            ("x-dup", b"two"),
            ("x-dup", b"three"),
            ("x-str", "from-value"),  # a value without raw_value
            ("x-utf8", "caf\u00e9".encode()),
        ]
    )
    headers = to_check_context(request).headers
    assert dict(headers) == {
        ":path": "/h",
        "x-dup": "one,two,three",
        "x-str": "from-value",
        "x-utf8": "caf\u00e9",
    }
    assert isinstance(headers, MappingProxyType)


def test_header_map_wins_over_the_headers_map() -> None:
    request = with_header_map([("x-a", b"raw")], headers={"x-a": "plain", "x-b": "b"})
    assert dict(to_check_context(request).headers) == {"x-a": "raw"}


def test_invalid_utf8_in_raw_value_is_replaced_not_fatal() -> None:
    request = with_header_map([("x-bin", b"\xff\xfe")])
    assert to_check_context(request).headers["x-bin"] == "\ufffd\ufffd"


# -- request line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/orders?id=7&x=1", "/orders", "id=7&x=1"),
        ("/orders", "/orders", ""),
        ("/orders?", "/orders", ""),
        ("/a?b?c", "/a", "b?c"),
        ("/p#frag", "/p", ""),
        ("/p?q=1#frag", "/p", "q=1"),
        ("?only=query", "/", "only=query"),
        ("/%2Fenc?a=%20b", "/%2Fenc", "a=%20b"),  # undecoded, as Envoy sends it
    ],
)
def test_path_and_query_are_split(raw: str, path: str, query: str) -> None:
    ctx = to_check_context(raw_request(path=raw))
    assert (ctx.path, ctx.query) == (path, query)


def test_query_params_are_decoded_and_repeated_values_kept() -> None:
    ctx = check_context("/s?a=1&b=x%20y&a=2&empty=")
    assert ctx.query_params == {"a": ["1", "2"], "b": ["x y"], "empty": [""]}


def test_an_empty_path_falls_back_to_the_path_header_then_slash() -> None:
    assert to_check_context(raw_request(headers={":path": "/from-header?x=1"})).path == "/from-header"
    assert to_check_context(raw_request()).path == "/"


def test_method_host_scheme_protocol() -> None:
    ctx = to_check_context(
        raw_request(method="PUT", host="api.test:8443", scheme="https", protocol="HTTP/2")
    )
    assert (ctx.method, ctx.host, ctx.scheme, ctx.protocol) == ("PUT", "api.test:8443", "https", "HTTP/2")


def test_method_host_scheme_fall_back_to_pseudo_headers() -> None:
    ctx = to_check_context(
        raw_request(headers={":method": "DELETE", ":authority": "h.test", ":scheme": "https"})
    )
    assert (ctx.method, ctx.host, ctx.scheme, ctx.protocol) == ("DELETE", "h.test", "https", "")


# -- body ----------------------------------------------------------------------------------------


def test_raw_body_is_bytes() -> None:
    assert check_context("/", raw_body=b'{"item":"book"}').body == b'{"item":"book"}'


def test_string_body_is_utf8_encoded() -> None:
    assert check_context("/", body="caf\u00e9").body == "caf\u00e9".encode()


def test_raw_body_wins_over_body() -> None:
    assert to_check_context(raw_request(body="text", raw_body=b"bytes")).body == b"bytes"


def test_no_body_is_none() -> None:
    assert check_context("/").body is None


@pytest.mark.parametrize(("value", "truncated"), [("true", True), ("false", False), (None, False)])
def test_partial_body_flag(value: str | None, truncated: bool) -> None:
    headers = {"x-envoy-auth-partial-body": value} if value is not None else {}
    assert check_context("/", raw_body=b"abc", headers=headers).body_truncated is truncated


# -- peers, TLS, ids -----------------------------------------------------------------------------


def test_plaintext_peers() -> None:
    request = check_request("/", source="192.0.2.7:40123")
    dst = request.attributes.destination.address.socket_address
    dst.address, dst.port_value = "127.0.0.1", 10000
    ctx = to_check_context(request)
    assert ctx.source == Peer(address="192.0.2.7", port=40123)
    assert ctx.destination == Peer(address="127.0.0.1", port=10000)


def test_tls_peers_carry_principal_certificate_service_labels() -> None:
    request = check_request("/")
    src = request.attributes.source
    src.principal = "spiffe://cluster.local/ns/a/sa/client"
    src.certificate = "-----BEGIN%20CERTIFICATE-----%0A..."
    src.service = "frontend"
    dst = request.attributes.destination
    dst.address.socket_address.address = "10.0.0.2"
    dst.address.socket_address.port_value = 443
    dst.principal = "gateway.example"
    dst.labels["zone"] = "eu-1"
    request.attributes.tls_session.sni = "api.example"
    ctx = to_check_context(request)
    assert ctx.source == Peer(
        address="10.0.0.1",
        port=40000,
        principal="spiffe://cluster.local/ns/a/sa/client",
        certificate="-----BEGIN%20CERTIFICATE-----%0A...",
        service="frontend",
    )
    assert ctx.destination.principal == "gateway.example"
    assert ctx.destination.port == 443
    assert dict(ctx.destination.labels) == {"zone": "eu-1"}
    assert ctx.tls_sni == "api.example"


def test_missing_peers_and_empty_tls_session() -> None:
    request = raw_request(path="/")
    request.attributes.tls_session.SetInParent()  # Envoy sends `tls_session {}` on plaintext
    ctx = to_check_context(request)
    assert ctx.source == Peer()
    assert ctx.destination == Peer()
    assert ctx.tls_sni == ""


def test_request_id_is_the_header_and_stream_id_is_envoys_id() -> None:
    ctx = check_context("/", request_id="c8e1e76a")
    assert ctx.request_id == "c8e1e76a"
    assert ctx.stream_id == "1234567890"
    assert to_check_context(raw_request(id="99")).request_id == ""


def test_context_extensions() -> None:
    ctx = check_context("/", context_extensions={"extsvc-policy": "p", "tier": "gold"})
    assert dict(ctx.context_extensions) == {"extsvc-policy": "p", "tier": "gold"}
    assert dict(check_context("/").context_extensions) == {}


def test_metadata_context_and_route_metadata_become_plain_python() -> None:
    request = check_request("/")
    meta = request.attributes.metadata_context.filter_metadata["gw.meta"]
    meta.update(
        {
            "tenant": "acme",
            "plan": {"name": "pro", "seats": 5, "flags": [True, None, 1.5, "x", {"deep": []}]},
            "active": False,
            "none": None,
        }
    )
    route = request.attributes.route_metadata_context.filter_metadata["gw.route"]
    route.update({"owner": "team-a"})
    ctx = to_check_context(request)
    assert ctx.metadata == {
        "gw.meta": {
            "tenant": "acme",
            "plan": {"name": "pro", "seats": 5.0, "flags": [True, None, 1.5, "x", {"deep": []}]},
            "active": False,
            "none": None,
        }
    }
    assert isinstance(ctx.metadata["gw.meta"]["plan"]["seats"], float)
    assert type(ctx.metadata["gw.meta"]["plan"]) is dict
    assert type(ctx.metadata["gw.meta"]["plan"]["flags"]) is list
    assert ctx.route_metadata == {"gw.route": {"owner": "team-a"}}


def test_no_metadata_is_empty() -> None:
    ctx = check_context("/")
    assert dict(ctx.metadata) == {}
    assert dict(ctx.route_metadata) == {}


def test_struct_to_python_handles_bare_values() -> None:
    assert struct_to_python(struct_pb2.Value()) is None
    assert struct_to_python(struct_pb2.Value(bool_value=True)) is True
    assert struct_to_python(struct_pb2.Value(string_value="s")) == "s"
    list_value = struct_pb2.ListValue()
    list_value.extend([1, "a"])
    assert struct_to_python(list_value) == [1.0, "a"]


def test_lazy_context_equals_an_eager_one_and_binds_the_policy() -> None:
    request = check_request(
        "/orders?id=7", method="POST", headers={"x-a": "1"}, raw_body=b"{}",
        context_extensions={"k": "v"}, request_id="rid",
    )
    lazy = to_check_context(request)
    lazy.bind("orders")
    eager = CheckContext(
        method="POST", path="/orders", query="id=7", host="example.test", scheme="http",
        protocol="HTTP/1.1", headers=dict(request.attributes.request.http.headers), body=b"{}",
        source=Peer("10.0.0.1", 40000), request_id="rid", stream_id="1234567890",
        context_extensions={"k": "v"}, policy="orders",
    )
    assert lazy == eager
    assert lazy.policy == "orders"
    assert repr(lazy) == "CheckContext(POST /orders, policy='orders')"


# -- Decision -> CheckResponse ---------------------------------------------------------------------


def test_allow_without_mutations_is_an_empty_ok_response() -> None:
    wire = to_check_response(Decision.allow())
    assert wire.status.code == 0
    assert wire.WhichOneof("http_response") == "ok_response"
    assert len(wire.ok_response.headers) == 0
    assert not wire.HasField("dynamic_metadata")


def test_allow_header_mutations() -> None:
    decision = Decision.allow(
        upstream_set={"X-User": "alice"},
        upstream_append=[("x-trace", "authz")],
        upstream_remove=["Authorization", "cookie"],
    )
    ok = to_check_response(decision).ok_response
    headers = [(o.header.key, o.header.value, o.HasField("append"), o.append.value) for o in ok.headers]
    assert headers == [("x-user", "alice", True, False), ("x-trace", "authz", True, True)]
    assert list(ok.headers_to_remove) == ["authorization", "cookie"]
    for option in ok.headers:
        # ext_authz: Envoy reads `value` (docs/internals/envoy-behaviour.md §1.3)
        assert option.header.raw_value == b""


@pytest.mark.parametrize(
    ("action", "wire"),
    [
        (ResponseHeaderAction.APPEND, HVO.APPEND_IF_EXISTS_OR_ADD),
        (ResponseHeaderAction.ADD_IF_ABSENT, HVO.ADD_IF_ABSENT),
        (ResponseHeaderAction.OVERWRITE_IF_EXISTS, HVO.OVERWRITE_IF_EXISTS),
        (ResponseHeaderAction.OVERWRITE, HVO.OVERWRITE_IF_EXISTS_OR_ADD),
    ],
)
def test_response_header_actions(action: ResponseHeaderAction, wire: int) -> None:
    ok = to_check_response(
        Decision.allow(response_headers=[ResponseHeader("x-frame-options", "DENY", action)])
    ).ok_response
    (option,) = ok.response_headers_to_add
    assert (option.header.key, option.header.value, option.append_action) == (
        "x-frame-options", "DENY", wire,
    )
    assert not option.HasField("append")


def test_default_response_header_action_is_append() -> None:
    assert ResponseHeader("x", "1").action is ResponseHeaderAction.APPEND


def test_query_mutations_keep_case() -> None:
    ok = to_check_response(
        Decision.allow(query_set={"Added": "1", "page": "2"}, query_remove=["Secret"])
    ).ok_response
    assert [(p.key, p.value) for p in ok.query_parameters_to_set] == [("Added", "1"), ("page", "2")]
    assert list(ok.query_parameters_to_remove) == ["Secret"]


def test_dynamic_metadata_goes_in_the_outer_field_only() -> None:
    wire = to_check_response(
        Decision.allow(metadata={"user": "alice", "roles": ["a", "b"], "n": 2, "ok": True})
    )
    assert wire.HasField("dynamic_metadata")
    assert struct_to_python(wire.dynamic_metadata) == {
        "user": "alice", "roles": ["a", "b"], "n": 2.0, "ok": True,
    }
    assert not wire.ok_response.HasField("dynamic_metadata")  # deprecated: it would replace it


def test_deny_is_a_denied_response_with_a_non_zero_code() -> None:
    wire = to_check_response(
        Decision.deny(
            429, "slow down", [("retry-after", "5"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
        )
    )
    assert wire.status.code == 7
    assert wire.WhichOneof("http_response") == "denied_response"
    denied = wire.denied_response
    assert denied.status.code == 429
    assert denied.body == "slow down"
    assert [(o.header.key, o.header.value) for o in denied.headers] == [
        ("retry-after", "5"), ("set-cookie", "a=1"), ("set-cookie", "b=2"),
    ]
    for option in denied.headers:
        # docs/internals/envoy-behaviour.md §1.4: append:true headers are dropped on replies
        assert not option.HasField("append")
        assert option.append_action == HVO.APPEND_IF_EXISTS_OR_ADD


def test_401_uses_grpc_code_16() -> None:
    decision = Decision.deny(401, headers={"WWW-Authenticate": "Bearer"})
    assert decision.grpc_code == 16
    wire = to_check_response(decision)
    assert wire.status.code == 16
    assert wire.denied_response.status.code == 401
    assert wire.denied_response.headers[0].header.key == "www-authenticate"


def test_an_explicit_grpc_code_is_kept() -> None:
    assert to_check_response(Decision.deny(403, grpc_code=14)).status.code == 14


def test_envoy_error_is_an_error_response_without_status() -> None:
    decision = Decision.deny(502, "upstream auth down", {"x-reason": "idp"})
    wire = to_check_response(decision, envoy_error=True)
    assert wire.status.code == 7
    assert wire.WhichOneof("http_response") == "error_response"
    assert not wire.error_response.HasField("status")  # unset -> Envoy's status_on_error
    assert wire.error_response.body == "upstream auth down"
    assert [(o.header.key, o.header.value) for o in wire.error_response.headers] == [("x-reason", "idp")]


def test_an_empty_envoy_error_is_still_an_error_response() -> None:
    # without error_response Envoy sees a plain denial (403) and skips failure_mode_allow
    # (docs/internals/envoy-behaviour.md §2.2)
    wire = to_check_response(Decision.deny(503), envoy_error=True)
    assert wire.WhichOneof("http_response") == "error_response"
    assert wire.status.code != 0


def test_constant_decisions_are_encoded_once_and_envoy_errors_apart() -> None:
    decision = Decision.deny(403, "no")
    error = to_check_response(decision, envoy_error=True)
    first = to_check_response(decision)
    assert first.WhichOneof("http_response") == "denied_response"
    assert to_check_response(decision) is first
    assert error.WhichOneof("http_response") == "error_response"
    assert to_check_response(decision, envoy_error=True) is error
    copy = decision.with_reason("other")
    assert to_check_response(copy) is not first  # a copy is a decision of its own
    assert to_check_response(copy) == first
    assert not hasattr(decision, "__dict__")  # the decision itself carries no cache


@pytest.mark.parametrize("status", [0, 100, 199, 600, 1000])
def test_deny_rejects_non_http_statuses(status: int) -> None:
    with pytest.raises(ValueError, match="200-599"):
        Decision.deny(status)


def test_deny_rejects_grpc_code_zero() -> None:
    with pytest.raises(ValueError, match="non-zero gRPC code"):
        Decision.deny(403, grpc_code=0)


def test_merge_refuses_denials() -> None:
    with pytest.raises(ValueError, match="only two allow"):
        Decision.allow().merge(Decision.deny())
    with pytest.raises(ValueError, match="only two allow"):
        Decision.deny().merge(Decision.allow())


def test_python_to_struct_round_trips() -> None:
    data = {"a": [1.0, "x", None, {"b": False}], "c": {}}
    assert struct_to_python(python_to_struct(data)) == data


def test_the_answer_cache_is_bounded_and_keyed_by_identity() -> None:
    cache = AnswerCache(max_entries=2)
    a, b, c = Decision.deny(403, "a"), Decision.deny(403, "b"), Decision.allow()
    first = cache.response(a)
    assert cache.response(a) is first
    assert cache.response(Decision.deny(403, "a")) is not first  # equal, but another decision
    cache.response(b)
    cache.response(c)
    assert len(cache) == 2
    assert cache.response(a) is not first  # the oldest went: built again
    assert cache.response(a) == first
