"""The GatewayExtension and TrafficPolicy CRDs the chart ships: current with the models, kgateway's
group, version and names, and their schemas accepting what the translator accepts and refusing
what an API server would refuse."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extsvc_controller import model
from extsvc_controller.crds import definitions

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "helm" / "extsvc" / "files" / "crds.yaml"
CASES = ROOT / "tests" / "controller" / "cases"


def structural_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What an API server's structural-schema check says of ``value`` (unknown fields are
    pruned, not refused, unless a field is typed; CEL rules are not run)."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            errors.append(f"{path}: must be an integer or a string")
        return errors
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind in checks and not isinstance(value, checks[kind]):
        return [f"{path}: must be of type {kind}"]
    if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: must be of type integer"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: must be one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: must match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            errors.append(f"{path}: wrong length")
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value < low or (schema.get("exclusiveMinimum") and value == low)):
            errors.append(f"{path}: must be at least {low}")
        if high is not None and (value > high or (schema.get("exclusiveMaximum") and value == high)):
            errors.append(f"{path}: must be at most {high}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            errors.append(f"{path}: wrong number of items")
        for n, item in enumerate(value):
            errors += structural_errors(schema.get("items", {}), item, f"{path}[{n}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        for name, item in value.items():
            if name in properties:
                errors += structural_errors(properties[name], item, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += structural_errors(schema["additionalProperties"], item, f"{path}.{name}")
    return errors


def crd_schema(kind: str) -> dict[str, Any]:
    crds = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all(SHIPPED.read_text())}
    schema: dict[str, Any] = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_the_shipped_crds_are_those_of_the_models() -> None:
    """helm/extsvc/files/crds.yaml is `extsvc-controller crds`: regenerate it after a model change."""
    assert list(yaml.safe_load_all(SHIPPED.read_text())) == definitions()


def test_group_version_and_names_are_kgatewayss() -> None:
    crds = list(yaml.safe_load_all(SHIPPED.read_text()))
    assert [(c["metadata"]["name"], c["spec"]["group"], c["spec"]["names"]["kind"],
             [v["name"] for v in c["spec"]["versions"]], c["spec"]["scope"]) for c in crds] == [
        ("gatewayextensions.gateway.kgateway.dev", "gateway.kgateway.dev", "GatewayExtension", ["v1alpha1"],
         "Namespaced"),
        ("trafficpolicies.gateway.kgateway.dev", "gateway.kgateway.dev", "TrafficPolicy", ["v1alpha1"],
         "Namespaced"),
    ]
    for crd in crds:
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert spec["x-kubernetes-preserve-unknown-fields"] is True  # kgateway's other fields kept


def _documents() -> list[dict[str, Any]]:
    out = []
    for path in sorted(CASES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in ("GatewayExtension", "TrafficPolicy"):
                out.append(doc)
    return out


def test_every_object_the_translator_accepts_is_accepted() -> None:
    accepted = [d for d in _documents() if model.parse_object(d)[0] is not None]
    assert len(accepted) > 20
    for doc in accepted:
        assert structural_errors(crd_schema(doc["kind"]), doc) == [], doc["metadata"]


EXT = {"apiVersion": "gateway.kgateway.dev/v1alpha1", "kind": "GatewayExtension", "metadata": {"name": "x"}}
POLICY = {"apiVersion": "gateway.kgateway.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "p"}}
REF = {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "shop"}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({**EXT, "spec": {"type": "ExtAuth",
                          "extAuth": {"grpcService": {"backendRef": {"name": "a", "port": 0}}}}},
         ".spec.extAuth.grpcService.backendRef.port: must be at least 1"),
        ({**EXT, "spec": {"type": "Nope"}}, ".spec.type: must be one of"),
        ({**EXT, "spec": {"type": "ExtProc", "extProc": {"grpcService": {}}}},
         ".spec.extProc.grpcService.backendRef: required"),
        ({**EXT, "spec": {"type": "ExtProc", "extProc": {"grpcService": {"backendRef": {"name": "a"}},
                                                           "failOpen": "yes"}}},
         ".spec.extProc.failOpen: must be of type boolean"),
        ({**POLICY, "spec": {"targetRefs": []}}, ".spec.targetRefs: wrong number of items"),
        ({**POLICY, "spec": {"targetRefs": [{**REF, "sectionName": "Not_Valid"}]}},
         ".spec.targetRefs[0].sectionName: must match"),
        ({**POLICY, "spec": {"targetRefs": [REF], "extAuth": {"extensionRef": {"name": ""}}}},
         ".spec.extAuth.extensionRef.name: wrong length"),
    ],
)
def test_what_an_api_server_would_refuse(doc: dict[str, Any], error: str) -> None:
    errors = structural_errors(crd_schema(doc["kind"]), doc)
    assert any(e.startswith(error) for e in errors), errors
    assert model.parse_object(doc)[0] is None  # the translator refuses it too


def test_kgateway_fields_extsvc_does_not_translate_are_kept() -> None:
    doc = {**POLICY, "spec": {"targetRefs": [REF], "cors": {"allowOrigins": ["https://a"]}}}
    assert structural_errors(crd_schema("TrafficPolicy"), doc) == []
