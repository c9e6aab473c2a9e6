"""CRD validation reports every failing rule; a policy names an invalid GatewayExtension as invalid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from extsvc_controller import model, render
from extsvc_controller.sources.files import load
from extsvc_controller.translate import Translation, translate

from .test_golden import COMMON


def errors(text: str) -> list[str]:
    raw: dict[str, Any] = yaml.safe_load(text)
    obj, problems = model.parse_object(raw)
    assert obj is None
    return problems


# --- 6. every failing rule of an object, at once ------------------------------------------------------


def test_gateway_extension_reports_every_rule() -> None:
    assert errors("""
apiVersion: gateway.kgateway.dev/v1alpha1
kind: GatewayExtension
metadata: {name: bad, namespace: demo}
spec:
  type: ExtProc
  extAuth:
    grpcService:
      backendRef: {name: extsvc}
      requestTimeout: 0ms
      retry: {backoff: {baseInterval: 0s, maxInterval: 1h}}
""") == [
        "spec.extAuth.grpcService.backendRef: Must have port for Service reference",
        "spec.extAuth.grpcService.retry.backoff.baseInterval: retry.BaseInterval must be at least 1ms.",
        "spec.extAuth.grpcService.requestTimeout: timeout must be at least 1ms.",
        "spec: extProc must be set when type is ExtProc",
    ]


def test_both_timeouts_of_ext_proc_are_reported() -> None:
    assert errors("""
apiVersion: gateway.kgateway.dev/v1alpha1
kind: GatewayExtension
metadata: {name: bad, namespace: demo}
spec:
  extProc:
    grpcService: {backendRef: {name: extsvc, port: 9001}}
    messageTimeout: 0ms
    maxMessageTimeout: soon
""") == [
        "spec.extProc.messageTimeout: timeout must be at least 1ms.",
        "spec.extProc.maxMessageTimeout: invalid timeout value",
    ]


def test_traffic_policy_reports_schema_and_rules_together() -> None:
    assert errors("""
apiVersion: gateway.kgateway.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: bad, namespace: demo}
spec:
  targetRefs: [{group: "", kind: Service, name: ""}]
  extAuth: {extensionRef: {name: authz}, disable: {}}
  rateLimit: {local: {tokenBucket: {maxTokens: 0, fillInterval: 10ms}}}
  bogus: {}
""") == [
        "spec.targetRefs[0].name: String should have at least 1 character",
        "spec.targetRefs[0]: targetRefs may only reference Gateway, HTTPRoute, GRPCRoute, or ListenerSet "
        "resources",
        "spec.extAuth: exactly one of the fields in [extensionRef disable] must be set",
        "spec.rateLimit.local.tokenBucket.maxTokens: Input should be greater than or equal to 1",
        "spec.rateLimit.local.tokenBucket: must be at least 50ms",
        "spec: unknown field(s): bogus",
    ]


def test_typed_objects_still_obey_the_rules() -> None:
    with pytest.raises(ValidationError, match="exactly one of the fields in \\[extensionRef disable\\]"):
        model.ExtAuthPolicy()
    policy = model.ExtAuthPolicy(extension_ref=model.NamespacedRef(name="authz"))
    assert policy.extension_ref is not None
    assert model.TrafficPolicySpec(ext_auth=policy).ext_auth == policy


# --- 4. a TrafficPolicy on an invalid GatewayExtension: "invalid", not "not found" --------------------

BROKEN = """
apiVersion: gateway.kgateway.dev/v1alpha1
kind: GatewayExtension
metadata: {name: broken, namespace: demo}
spec:
  extAuth: {grpcService: {backendRef: {name: extsvc}}}
---
apiVersion: gateway.kgateway.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: uses-broken, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop, sectionName: orders}]
  extAuth: {extensionRef: {name: broken}}
---
apiVersion: gateway.kgateway.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: uses-missing, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop, sectionName: public}]
  extAuth: {extensionRef: {name: missing}}
---
apiVersion: gateway.kgateway.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: jwt-on-broken, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop, sectionName: rest}]
  jwtAuth: {extensionRef: {name: broken}}
"""
INVALID = "spec.extAuth.grpcService.backendRef: Must have port for Service reference"


def translated(tmp_path: Path) -> Translation:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    return translate(load([COMMON, path]))


def policy_message(result: Translation, name: str) -> str:
    (status,) = [s for s in result.statuses if (s.kind, s.name) == ("TrafficPolicy", name)]
    conditions = status.ancestors[0].conditions if status.ancestors else tuple(status.conditions)
    return next(c.message for c in conditions if c.type == "Accepted")


def test_policy_on_an_invalid_extension_says_invalid(tmp_path: Path) -> None:
    result = translated(tmp_path)
    assert (
        policy_message(result, "uses-broken")
        == f"extauth: gateway extension demo/broken is invalid: {INVALID}"
    )
    assert policy_message(result, "uses-missing") == "extauth: demo/missing: gateway extension not found"
    assert policy_message(result, "jwt-on-broken") == (
        f"jwtAuth: not supported by extsvc-controller (GatewayExtension demo/broken is invalid: {INVALID}); "
        "rejected to fail closed"
    )


def test_explain_shows_the_invalid_extension(tmp_path: Path) -> None:
    text = render.explain_text(translated(tmp_path).explain)
    assert (
        "REPLACED by a 500 direct response: gateway.kgateway.dev/TrafficPolicy/demo/uses-broken: "
        f"extauth: gateway extension demo/broken is invalid: {INVALID}\n"
    ) in text
    assert "demo/uses-missing: extauth: demo/missing: gateway extension not found\n" in text


# --- a fail-open ext_proc extension with a body a processor may hold back -----------------------------

FAIL_OPEN = """
apiVersion: gateway.kgateway.dev/v1alpha1
kind: GatewayExtension
metadata: {{name: bodies, namespace: demo}}
spec:
  type: ExtProc
  extProc:
    grpcService: {{backendRef: {{name: extsvc, port: 9001}}}}
    {fail_open}
    processingMode: {{requestBodyMode: STREAMED, responseBodyMode: BUFFERED}}
---
apiVersion: gateway.kgateway.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: redact, namespace: demo}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop}}]
  extProc: {{extensionRef: {{name: bodies}}}}
"""


@pytest.mark.parametrize(
    ("fail_open", "warned"), [("", True), ("failOpen: true", True), ("failOpen: false", False)]
)
def test_a_fail_open_extension_with_a_streamed_body_is_warned_about(
    tmp_path: Path, fail_open: str, warned: bool
) -> None:
    path = tmp_path / "failopen.yaml"
    path.write_text(FAIL_OPEN.format(fail_open=fail_open))
    result = translate(load([COMMON, path]))
    (status,) = [s for s in result.statuses if (s.kind, s.name) == ("TrafficPolicy", "redact")]
    expected = [
        "ext_proc/demo/bodies: failOpen (kgateway's default) with a request STREAMED body: if extsvc "
        "fails mid-body, Envoy sends the rest of it on unprocessed, so a processor that collects the "
        "body (json-redact) lets only its tail through; set failOpen: false where bodies are redacted "
        "(or json-redact's collect: envoy)"
    ]
    assert [w for w in status.warnings if "failOpen" in w] == (expected if warned else [])
