"""``Authorization/Check`` over real gRPC: answers, policy choice, failures, logs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from extsvc.testing import ScriptPlugin

from .conftest import Serve, eventually, write_file

ALLOW_DENY = """
policies:
  mutate:
    steps:
      - plugin: set-headers
        config:
          upstream: {x-user: alice}
          append_upstream: {x-trace: authz}
          remove_upstream: [authorization]
          response:
            - {name: x-frame-options, value: DENY, action: overwrite}
            - {name: x-extsvc, value: hi}
          query_set: {source: gateway}
          query_remove: [debug]
          metadata: {tier: gold}
  refuse:
    steps:
      - plugin: deny
        config:
          status: 401
          body: "log in first\\n"
          headers: {www-authenticate: 'Bearer realm="x"', content-type: text/plain}
"""


async def test_allow_carries_every_header_and_query_mutation(serve: Serve) -> None:
    async with serve(ALLOW_DENY) as served:
        response = await served.check(context_extensions={"extsvc-policy": "mutate"})
        assert served.sample(
            "extsvc_authz_decisions_total", policy="mutate", decision="allow"
        ) == 1
    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    # docs/internals/envoy-behaviour.md §1.4: only the `append` bool counts for upstream headers.
    assert [(h.header.key, h.header.value, h.append.value) for h in ok.headers] == [
        ("x-user", "alice", False),
        ("x-trace", "authz", True),
    ]
    assert all(h.HasField("append") for h in ok.headers)
    assert list(ok.headers_to_remove) == ["authorization"]
    assert [(h.header.key, h.header.value, h.append_action) for h in ok.response_headers_to_add] == [
        ("x-frame-options", "DENY", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-extsvc", "hi", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    ]
    assert [(q.key, q.value) for q in ok.query_parameters_to_set] == [("source", "gateway")]
    assert list(ok.query_parameters_to_remove) == ["debug"]
    assert json_format.MessageToDict(response.dynamic_metadata) == {"tier": "gold"}


async def test_deny_carries_status_body_and_headers(serve: Serve) -> None:
    async with serve(ALLOW_DENY) as served:
        response = await served.check(context_extensions={"extsvc-policy": "refuse"})
        assert served.sample(
            "extsvc_authz_decisions_total", policy="refuse", decision="deny"
        ) == 1
    assert response.status.code != 0  # docs/internals/envoy-behaviour.md §2.2: a non-zero code on an OK RPC
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    assert denied.status.code == 401
    assert denied.body == "log in first\n"
    assert {h.header.key: h.header.value for h in denied.headers} == {
        "www-authenticate": 'Bearer realm="x"',
        "content-type": "text/plain",
    }
    assert not any(h.HasField("append") for h in denied.headers)  # append: true would be dropped


# -- choosing the policy -------------------------------------------------------------------------


def tagging(*names: str) -> str:
    """Policies that allow and tag the request with their own name in ``x-policy``."""
    return "".join(
        f"  {name}:\n    steps: [{{plugin: set-headers, config: {{upstream: {{x-policy: {name}}}}}}}]\n"
        for name in names
    )


CHOICE = f"""
default_policy: fallback
authority_policies:
  authz.example.com: by-authority
policies:
{tagging("fallback", "by-authority", "by-extension", "by-name")}
"""


def policy_of(response: Any) -> str:
    return str({h.header.key: h.header.value for h in response.ok_response.headers}["x-policy"])


@pytest.mark.parametrize(
    ("extensions", "authority", "expected"),
    [
        pytest.param({"extsvc-policy": "by-extension"}, "", "by-extension", id="context-extension"),
        pytest.param(
            {"extsvc-policy": "by-extension"}, "authz.example.com", "by-extension",
            id="context-extension-beats-authority",
        ),
        pytest.param({}, "authz.example.com", "by-authority", id="authority-policies"),
        pytest.param({}, "authz.example.com:9001", "by-authority", id="authority-with-port"),
        pytest.param({}, "by-name", "by-name", id="authority-is-a-policy-name"),
        pytest.param({}, "by-name:9001", "by-name", id="policy-name-with-port"),
        pytest.param({}, "", "fallback", id="default-policy"),
        pytest.param({}, "unmapped.example.com", "fallback", id="unmapped-authority-default"),
        pytest.param({"other": "x"}, "", "fallback", id="unrelated-extension"),
    ],
)
async def test_policy_choice(
    serve: Serve, extensions: dict[str, str], authority: str, expected: str
) -> None:
    # grpcio 1.85's aio server cannot read :authority (service.call_authority), so the Envoy
    # config sends it as x-extsvc-authority initial metadata; that is what arrives here.
    metadata = [("x-extsvc-authority", authority)] if authority else []
    async with serve(CHOICE) as served:
        response = await served.check(context_extensions=extensions, metadata=metadata)
    assert response.status.code == 0
    assert policy_of(response) == expected


@pytest.mark.parametrize(
    ("config", "extensions", "label", "logged"),
    [
        # the name comes from the request: the label is one value for all unknown names
        pytest.param(CHOICE, {"extsvc-policy": "nope"}, "(unknown)", "unknown policy 'nope'",
                     id="unknown-name"),
        pytest.param(f"policies:\n{tagging('p')}", {}, "", "no default_policy",
                     id="no-choice-no-default"),
    ],
)
async def test_unknown_policy_is_denied_on_an_ok_rpc_and_counted(
    serve: Serve,
    caplog: pytest.LogCaptureFixture,
    config: str,
    extensions: dict[str, str],
    label: str,
    logged: str,
) -> None:
    async with serve(config) as served:
        response = await served.check(context_extensions=extensions, request_id="rid-unknown")
        assert served.sample("extsvc_authz_unknown_policy_total", policy=label) == 1
        assert served.sample("extsvc_authz_decisions_total", policy=label, decision="deny") == 1
    assert response.status.code != 0
    assert response.denied_response.status.code == 403
    warning = next(r for r in caplog.records if r.name == "extsvc.authz.service")
    assert warning.levelno == logging.WARNING
    assert "rid-unknown" in warning.getMessage()
    assert logged in warning.getMessage()


async def test_check_before_any_config_is_an_error_response(
    serve: Serve, tmp_path: Path
) -> None:
    config = tmp_path / "broken.yaml"
    write_file(config, "policies: [not, a, mapping]\n")
    async with serve(config) as served:
        assert served.generation == 0
        response = await served.check()
        assert served.sample("extsvc_authz_decisions_total", policy="", decision="error") == 1
    # docs/internals/envoy-behaviour.md §2.2: error_response without a status -> Envoy's status_on_error /
    # failure_mode_allow.
    assert response.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert response.WhichOneof("http_response") == "error_response"
    assert not response.error_response.HasField("status")


# -- a failing step: on_error, never an aborted RPC ---------------------------------------------


def failing(on_error: str, answer: str, timeout_ms: int | None = None) -> str:
    timeout = f"\n    timeout_ms: {timeout_ms}" if timeout_ms else ""
    return f"""
default_policy: p
policies:
  p:
    on_error: {on_error}{timeout}
    error_reply: {{status: 502, body: "try later\\n"}}
    steps:
      - {{plugin: header-match, config: {{match: {{path: {{prefix: /public}}}}, on_match: allow}}}}
      - {{name: flaky-step, plugin: script, config: {{answer: {answer}}}}}
"""


def assert_answered_per(on_error: str, response: Any) -> None:
    kind = response.WhichOneof("http_response")
    code = response.status.code
    if on_error == "allow":
        assert (code, kind) == (0, "ok_response")
    elif on_error == "deny":
        assert code != 0
        assert kind == "denied_response"
        denied = response.denied_response
        assert (denied.status.code, denied.body) == (502, "try later\n")
    else:  # envoy: Envoy's own status_on_error / failure_mode_allow decide
        assert code != 0
        assert kind == "error_response"
        assert not response.error_response.HasField("status")


@pytest.mark.parametrize("on_error", ["deny", "allow", "envoy"])
async def test_a_raising_step_is_answered_per_on_error_and_named_in_the_log(
    serve: Serve, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    async with serve(failing(on_error, "raise")) as served:
        response = await served.check("/x", request_id="rid-raise")
        labels = {"policy": "p", "plugin": "script"}
        assert served.sample("extsvc_step_errors_total", reason="exception", **labels) == 1
        assert served.sample("extsvc_authz_decisions_total", policy="p", decision="error") == 1
    assert_answered_per(on_error, response)
    messages = [r.getMessage() for r in caplog.records if r.name == "extsvc.authz.pipeline"]
    assert any(
        "flaky-step (script) raised RuntimeError('boom')" in m and "rid-raise" in m
        for m in messages
    ), messages
    assert any(f"on_error={on_error}" in m and "flaky-step" in m for m in messages), messages


@pytest.mark.parametrize("on_error", ["deny", "allow", "envoy"])
async def test_a_step_overrunning_the_policy_timeout_is_answered_per_on_error(
    serve: Serve, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    async with serve(failing(on_error, "sleep", timeout_ms=100)) as served:
        response = await served.check("/x", timeout=5, request_id="rid-slow")
        labels = {"policy": "p", "plugin": "script"}
        assert served.sample("extsvc_step_errors_total", reason="timeout", **labels) == 1
    assert_answered_per(on_error, response)
    assert any(
        "step 'flaky-step' (script) overran the deadline" in r.getMessage()
        and "rid-slow" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def test_a_step_overrunning_the_rpc_deadline_is_answered_before_it(serve: Serve) -> None:
    # The step gets the RPC's remaining time minus the margin kept for sending the answer, so
    # Envoy receives the on_error answer instead of its own timeout (docs/internals/envoy-behaviour.md §1.1).
    async with serve(failing("deny", "sleep"), deadline_margin_ms=400) as served:
        response = await served.check("/x", timeout=1.0)
    assert_answered_per("deny", response)


async def test_an_untouched_step_is_not_blamed(serve: Serve) -> None:
    async with serve(failing("deny", "raise")) as served:
        response = await served.check("/public/page")
        assert served.sample(
            "extsvc_step_errors_total", policy="p", plugin="script", reason="exception"
        ) == 0
    assert (response.status.code, response.WhichOneof("http_response")) == (0, "ok_response")


class _Entries:
    """Stands in for ScriptPlugin.entered: counts the steps that started."""

    def __init__(self) -> None:
        self.count = 0

    def set(self) -> None:
        self.count += 1


@pytest.mark.parametrize("on_error", ["deny", "allow", "envoy"])
async def test_checks_over_max_inflight_get_the_on_error_answer_at_once(
    serve: Serve, script: ScriptPlugin, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    entries = _Entries()
    script.entered = entries  # type: ignore[assignment]
    async with serve(failing(on_error, "wait"), max_authz_inflight=2) as served:
        held = [asyncio.ensure_future(served.check("/x", timeout=5)) for _ in range(2)]
        await eventually(lambda: entries.count == 2, what="two Checks waiting in their step")
        shed = await served.check("/x", timeout=5, request_id="rid-shed")
        assert served.sample("extsvc_shed_total", service="ext_authz") == 1
        assert entries.count == 2  # no step ran for the shed Check
        script.release.set()
        answers = await asyncio.gather(*held)
        after = await served.check("/x", timeout=5)  # below the cap again: the steps run
    # the shed Check gets the policy's on_error answer: never a silent allow
    assert_answered_per(on_error, shed)
    assert all(a.WhichOneof("http_response") == "ok_response" for a in [*answers, after])
    assert any("max_authz_inflight" in r.getMessage() and "rid-shed" in r.getMessage()
               for r in caplog.records), caplog.text
